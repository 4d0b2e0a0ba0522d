"""The synthetic radiology report, consistent with what was drawn."""
from __future__ import annotations

from .constants import _HP, _IPF, _SSC

def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _make_report(rng, labels, info) -> str:
    """A synthetic report consistent with ``labels``; wording, order and optional sentences vary."""
    pats = set(labels["patterns"])
    sub = labels["subtype"]
    frac = info.get("fraction", 0.0)
    severity = "mild" if frac < 0.14 else ("moderate" if frac < 0.24 else "extensive")
    lung, airways, pleura, heart, impression = [], [], [], [], []

    if labels["ild"]:
        bases = _pick(rng, ["lung bases", "lower lobes", "lower zones"])
        upper = _pick(rng, ["upper and mid zones", "upper lobes", "upper and middle lung zones"])
        where = bases if info.get("distribution") == "basal" else upper
        if "reticulation" in pats:
            if sub == _IPF:
                lung.append(_pick(rng, [
                    f"Subpleural, basal-predominant reticulation, most marked in the {bases}.",
                    "There is bilateral subpleural reticulation with a basal and posterior predominance.",
                    f"Peripheral reticulation is seen in both lungs, worst in the {bases}.",
                ]))
            elif sub == _SSC:
                lung.append(_pick(rng, [
                    f"Fine reticulation is superimposed on the ground-glass change in the {bases}.",
                    f"There is fine intralobular reticulation in the {bases}.",
                ]))
            else:
                lung.append(_pick(rng, [
                    f"Some reticulation is present in the {where}.",
                    "Mild reticulation accompanies the ground-glass change.",
                ]))
        if "ground-glass opacity" in pats:
            if sub == _SSC:
                lung.insert(0, _pick(rng, [
                    f"Bilateral symmetric ground-glass opacity in the {bases} with relative sparing of the immediate subpleural lung.",
                    "Basal-predominant ground-glass opacity, symmetric, with subpleural sparing.",
                    f"There is ground-glass opacity in the {bases}, sparing the immediate subpleural region.",
                ]))
            elif sub == _HP:
                lung.insert(0, _pick(rng, [
                    f"Patchy ground-glass opacity in the {upper}.",
                    f"There is patchy, bilateral ground-glass opacity predominantly in the {upper}.",
                    f"Geographic ground-glass opacity involves the {upper}.",
                ]))
            else:
                lung.append(_pick(rng, [
                    "Minor ground-glass opacity within the fibrotic areas.",
                    "There is a little ground-glass opacity in the affected lung.",
                ]))
        if "honeycombing" in pats:
            lung.append(_pick(rng, [
                f"Honeycombing is present in the subpleural {bases}.",
                "Subpleural honeycombing with stacked cysts in several rows at both bases.",
                f"Clustered thick-walled subpleural cysts at the {bases} in keeping with honeycombing.",
            ]))
        elif sub == _SSC and rng.random() < 0.6:
            lung.append(_pick(rng, ["No honeycombing.", "Honeycombing is not seen."]))
        if "centrilobular nodules" in pats:
            lung.append(_pick(rng, [
                "Numerous ill-defined centrilobular nodules.",
                f"Scattered poorly defined centrilobular nodules in the {upper}.",
                "Centrilobular nodules of ground-glass density are noted.",
            ]))
        if "mosaic attenuation" in pats:
            lung.append(_pick(rng, [
                "Mosaic attenuation with lobular areas of decreased attenuation, suggesting air trapping.",
                "There is mosaic attenuation with sharply marginated lobules of low attenuation.",
                "Lobular areas of low attenuation produce mosaic attenuation.",
            ]))
        lung.append(_pick(rng, [
            f"The overall extent of disease is {severity}.",
            f"Disease extent: {severity}.",
            f"The abnormality is {severity} in extent.",
        ]))
        if rng.random() < 0.5:
            lung.append(_pick(rng, ["No consolidation.", "No focal consolidation.", "No suspicious pulmonary nodule."]))
        if "traction bronchiectasis" in pats:
            airways.append(_pick(rng, [
                f"Traction bronchiectasis within the fibrotic areas of the {where}.",
                "There is traction bronchiectasis and bronchiolectasis in the affected lung.",
                "Dilated, distorted airways within the abnormal lung consistent with traction bronchiectasis.",
            ]))
        airways.append(_pick(rng, ["The trachea and main bronchi are patent.", "Central airways are patent.",
                                   "The central airways are clear."]))
        if rng.random() < 0.4:
            pleura.append(_pick(rng, ["Mild pleural thickening at the bases.", "No pleural effusion."]))
        else:
            pleura.append(_pick(rng, ["No pleural effusion or pneumothorax.", "No pleural effusion.",
                                      "Pleural surfaces are unremarkable."]))
        heart.append(_pick(rng, ["Heart size is normal.", "The heart is not enlarged.", "Normal heart size."]))
        heart.append(_pick(rng, ["No mediastinal lymphadenopathy.", "Mildly enlarged mediastinal lymph nodes, likely reactive.",
                                 "No pericardial effusion."]))

        if sub == _IPF:
            typical = "honeycombing" in pats
            impression.append(_pick(rng, [
                f"{'Usual' if typical else 'Probable usual'} interstitial pneumonia (UIP) pattern, consistent with idiopathic pulmonary fibrosis.",
                f"Fibrotic interstitial lung disease in a {'typical' if typical else 'probable'} UIP pattern, most consistent with idiopathic pulmonary fibrosis.",
                f"{'Usual' if typical else 'Probable usual'} interstitial pneumonia pattern; in the appropriate clinical setting, idiopathic pulmonary fibrosis.",
            ]))
        elif sub == _SSC:
            impression.append(_pick(rng, [
                "Nonspecific interstitial pneumonia (NSIP) pattern, consistent with interstitial lung disease related to systemic sclerosis.",
                "Basal ground-glass opacity and fine reticulation with subpleural sparing: NSIP pattern, in keeping with systemic sclerosis-associated interstitial lung disease.",
                "Interstitial lung disease in an NSIP pattern, compatible with systemic sclerosis.",
            ]))
        else:
            fib = "reticulation" in pats
            impression.append(_pick(rng, [
                f"{'Fibrotic' if fib else 'Non-fibrotic'} hypersensitivity pneumonitis is the most likely diagnosis.",
                f"Findings compatible with {'fibrotic ' if fib else ''}hypersensitivity pneumonitis.",
                "Upper-zone predominant ground-glass opacity" + (", centrilobular nodules" if "centrilobular nodules" in pats else "")
                + (" and mosaic attenuation" if "mosaic attenuation" in pats else "") + ", consistent with hypersensitivity pneumonitis.",
            ]))
        if rng.random() < 0.5:
            impression.append(_pick(rng, ["Recommend multidisciplinary discussion.",
                                          "Comparison with prior imaging would help assess progression.",
                                          "Pulmonary function testing is suggested."]))
    else:
        lung.append(_pick(rng, [
            "The lungs are clear.", "No interstitial abnormality.", "Normal lung parenchyma.",
            "No reticulation, ground-glass opacity or honeycombing.",
        ]))
        nod = info.get("nodule")
        if nod:
            lung.append(_pick(rng, [
                f"A {nod['diam_mm']:.0f} mm solid nodule in the {nod['loc']}.",
                f"There is a {nod['diam_mm']:.0f} mm solid pulmonary nodule in the {nod['loc']}, likely benign.",
            ]))
        if "dependent atelectasis" in labels.get("benign", []):
            lung.append(_pick(rng, ["Mild dependent atelectasis at the lung bases.",
                                    "Minor dependent subpleural atelectasis posteriorly at both bases."]))
        if rng.random() < 0.5:
            lung.append(_pick(rng, ["No consolidation.", "No pneumothorax.", "No emphysema."]))
        airways.append(_pick(rng, ["The trachea and main bronchi are patent.", "Central airways are patent.",
                                   "No bronchiectasis or bronchial wall thickening."]))
        pleura.append(_pick(rng, ["No pleural effusion or pneumothorax.", "No pleural effusion.",
                                  "Pleural surfaces are unremarkable."]))
        heart.append(_pick(rng, ["Heart size is normal.", "The heart is not enlarged.", "Normal heart size."]))
        if rng.random() < 0.6:
            heart.append(_pick(rng, ["No mediastinal lymphadenopathy.", "No pericardial effusion."]))
        impression.append(_pick(rng, [
            "No evidence of interstitial lung disease.", "No CT features of interstitial lung disease.",
            "Normal chest CT. No interstitial lung disease.",
        ]))
        if nod:
            impression.append(f"{nod['diam_mm']:.0f} mm pulmonary nodule in the {nod['loc']}, likely benign.")

    # shuffle the non-leading sentences a little so order varies
    if len(lung) > 2:
        head, rest = lung[:1], lung[1:]
        rng.shuffle(rest)
        lung = head + rest
    if len(heart) > 1 and rng.random() < 0.5:
        heart.reverse()
    return ("FINDINGS:\n"
            f"LUNG PARENCHYMA: {' '.join(lung)}\n"
            f"AIRWAYS: {' '.join(airways)}\n"
            f"PLEURA: {' '.join(pleura)}\n"
            f"HEART AND MEDIASTINUM: {' '.join(heart)}\n"
            "\nIMPRESSION:\n"
            + "\n".join(f"{i + 1}. {line}" for i, line in enumerate(impression)))
