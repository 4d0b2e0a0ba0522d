"""zeroshot-ild-train: split, preprocess, train (DAPT), evaluate and study ZeroShotILD models on a cohort.

    zeroshot-ild-train split        MANIFEST --out SPLIT.csv          patient-level train/val/test
    zeroshot-ild-train preprocess   MANIFEST --cache DIR              cached montages (--shard i/N)
    zeroshot-ild-train train        MANIFEST --cache DIR --out RUN    DAPT (any loss, DDP, --resume)
    zeroshot-ild-train sweep        MANIFEST --cache DIR --out DIR    learning-rate sweep
    zeroshot-ild-train export       RUN/checkpoints/last.ckpt --out MODEL.safetensors
    zeroshot-ild-train evaluate     MANIFEST --out DIR --model M ...  AUROC/AUPRC/F1 with 95 % CIs
    zeroshot-ild-train grid         MANIFEST --out DIR ...            the tables of Van Uden et al. 2023
    zeroshot-ild-train reader-study export|analyze ...                numbered montages, ICC(3,1)
    zeroshot-ild-train probe        MANIFEST --cache DIR --out DIR    K-shot linear probing
    zeroshot-ild-train alignment    MANIFEST --cache DIR --out DIR    image-text alignment
    zeroshot-ild-train preview-text MANIFEST --text lung -n 3         what --text picks (stdout only)

Every command is a thin adapter: montages, models and scores come from the engine
(``ZeroShotILDLib``), training from ``zeroshot_ild_train.dapt``, metrics and tables from
``zeroshot_ild_train.metrics`` / ``zeroshot_ild_train.plots``. Bad input ends with one line on stderr and exit
code 2; a command that finished but could not use some scans exits 3 (the same codes as
``zeroshot-ild``); result folders are written to a temporary folder and moved into place at the
end, so an interrupted command leaves no half-written results.

The parser is jsonargparse's: every command takes ``--config FILE.yaml`` (keys as ``--print-config``
prints them; flags on the command line win) and ``--print-config``. The training flags of ``train``
and ``sweep`` are derived from ``DaptConfig`` (``cli_train``). The commands live in modules named
for what they do: ``cli_data`` (split, preprocess, preview-text, runs), ``cli_train`` (train, sweep,
export), ``cli_evaluate`` (evaluate, grid) and ``cli_study`` (reader-study, probe, alignment).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from ZeroShotILDLib.cli import (EXIT_CANCELLED, EXIT_INPUT, EXIT_PARTIAL, TqdmProgress, _add_settings_args, log_level,
                                quiet_itk)
from ZeroShotILDLib.errors import Cancelled, InputError

from .cli_common import (CACHE_SETTINGS, DEFAULT_TEXT, PROG, SCORE_CACHE, _bar, _cache_settings, _csv_list,  # noqa: F401
                         _pairs, _plain, _read_manifest, _staged_output, _with_pixel_spacing, _write_json, _write_rows,
                         log)
from .cli_data import _cmd_preprocess, _cmd_preview_text, _cmd_runs, _cmd_split
from .cli_evaluate import _cmd_evaluate, _cmd_grid
from .cli_study import _cmd_alignment, _cmd_probe, _cmd_reader_analyze, _cmd_reader_export
from .cli_train import _cmd_export, _cmd_sweep, _cmd_train, add_training_args, apply_recipe
from .files import finish_all


# ----------------------------------------------------------------------------------------------
# Parser (jsonargparse)
# ----------------------------------------------------------------------------------------------
def _help_formatter():
    from jsonargparse import ActionConfigFile, DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter):
        """Examples kept as written; a default shown where the help does not give it already (no type names)."""

        def _fill_text(self, text, width, indent):
            return "".join(indent + line for line in text.splitlines(keepends=True))

        def _get_help_string(self, action):
            text = action.help or ""
            default = action.default
            if (isinstance(action, (ActionConfigFile, argparse._CountAction)) or not action.option_strings or default is None
                    or default is False or default == argparse.SUPPRESS or "default" in text):
                return text
            return f"{text} (default: %(default)s)" if text else "default: %(default)s"

    return HelpFormatter


def _new_parser(**kwargs):
    try:
        from jsonargparse import ArgumentParser
    except ImportError:
        raise InputError(f"{PROG} needs the training extra (jsonargparse, Lightning, ...): "
                         "pip install 'zeroshot-ild[train]'") from None

    class TextByDefault(ArgumentParser):
        """An argument given no type is text: jsonargparse would take any YAML value for it from --config
        (``model: {a: 1}`` reached the command as a dict and failed there with a traceback)."""

        def add_argument(self, *args, **kw):
            if "type" not in kw and kw.get("action", "store") in ("store", "append", "extend") and kw.get("nargs") != 0:
                kw["type"] = str
            return super().add_argument(*args, **kw)

    # Errors are raised (exit_on_error=False) and printed by main in one line; jsonargparse's own
    # --print_config is replaced by --print-config (the spelling this CLI has always had: _print_config).
    return TextByDefault(formatter_class=_help_formatter(), exit_on_error=False, print_config=None, **kwargs)


def _add_config_args(p) -> None:
    """--config FILE (jsonargparse's ActionConfigFile) and --print-config on a command's parser."""
    from jsonargparse import ActionConfigFile

    p.add_argument("--config", action=ActionConfigFile,
                   help="YAML file of this command's settings (keys as printed by --print-config); "
                        "flags on the command line win")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective settings as YAML (usable as --config) and exit")


def _engine_settings_args(p) -> None:
    """The engine's montage/scoring flags (``zeroshot-ild``'s), as jsonargparse takes them."""
    _add_settings_args(p)
    for action in p._actions:
        # jsonargparse sets nargs=N values item by item into the default: a tuple default must be a list.
        if isinstance(action.default, tuple):
            action.default = list(action.default)


def _add_model_args(p) -> None:
    p.add_argument("--model", default="chexzero", help="registry name, dapt:<checkpoint> or a checkpoint path")
    p.add_argument("--checkpoint", help="weights file for a registry model")
    p.add_argument("--weights-dir", help="folder where registry weights are looked for")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")


def _add_pixel_spacing_arg(p) -> None:
    p.add_argument("--pixel-spacing-mm", type=Optional[float],
                   help="pixel size of 2-D PNG/JPG rows without a pixel_spacing_mm column (default: 1 mm, with a warning)")


#: Two examples per command, shown under its --help.
EPILOGS = {
    "": "exit codes: 0 done, 2 bad input (nothing written), 3 finished but some scans failed (listed), 130 cancelled.\n"
        "examples:\n  zeroshot-ild-train split cohort.csv --out split.csv --stratify ild\n"
        "  zeroshot-ild-train evaluate split.csv --out eval --models clip-vit-b-32-laion --models biomedclip",
    "split": "zeroshot-ild-train split cohort.csv --out split.csv\n"
             "zeroshot-ild-train split cohort.jsonl --out split.jsonl --val-fraction 0.1 --test-fraction 0.2 --stratify subtype",
    "preprocess": "zeroshot-ild-train preprocess split.csv --cache montages --workers 2\n"
                  "zeroshot-ild-train preprocess split.csv --cache montages --shard $SLURM_ARRAY_TASK_ID/16",
    "train": "zeroshot-ild-train train split.csv --cache montages --out run1 --model clip-vit-b-32-laion\n"
             "zeroshot-ild-train train split.csv --cache montages --out run1 --resume",
    "sweep": "zeroshot-ild-train sweep split.csv --cache montages --out sweep\n"
             "zeroshot-ild-train sweep split.csv --cache montages --out sweep --lrs 1e-5,1e-4 --max-steps 2000",
    "export": "zeroshot-ild-train export run1/checkpoints/last.ckpt --out run1.safetensors\n"
              "zeroshot-ild-train export elsewhere/last.ckpt --out m.safetensors --model clip-vit-b-32-laion --loss clip",
    "evaluate": "zeroshot-ild-train evaluate split.csv --out eval --models clip-vit-b-32-laion\n"
                "zeroshot-ild-train evaluate split.csv --out eval --models dapt:run1.safetensors --ensemble run1/ensemble.json",
    "grid": "zeroshot-ild-train grid split.csv --out grid --models clip-vit-b-32-laion,biomedclip\n"
            "zeroshot-ild-train grid split.csv --out grid --retrievals clip,random --montage-sizes 4,8 --filter-thresholds 0.2,0.5",
    "reader-study": "zeroshot-ild-train reader-study export split.csv --out study --readers r1,r2 --blind\n"
                    "zeroshot-ild-train reader-study analyze study r1.csv r2.csv --out study_results",
    "export-study": "zeroshot-ild-train reader-study export split.csv --out study --readers r1,r2\n"
                    "zeroshot-ild-train reader-study export split.csv --out study --methods random,clip --blind",
    "analyze-study": "zeroshot-ild-train reader-study analyze study r1.csv r2.csv --out study_results\n"
                     "zeroshot-ild-train reader-study analyze study sheets/*.csv --out study_results -q",
    "probe": "zeroshot-ild-train probe split.csv --cache montages --out probe --model clip-vit-b-32-laion\n"
             "zeroshot-ild-train probe split.csv --cache montages --out probe --label ild --k 8 --repeats 10",
    "alignment": "zeroshot-ild-train alignment split.csv --cache montages --out align --model clip-vit-b-32-laion\n"
                 "zeroshot-ild-train alignment split.csv --cache montages --out align --model dapt:run1.safetensors",
    "preview-text": "zeroshot-ild-train preview-text cohort.csv --text impression\n"
                    "zeroshot-ild-train preview-text cohort.csv --text findings+impression -n 5",
    "runs": "zeroshot-ild-train runs results/\n"
            "zeroshot-ild-train runs results/ --csv > runs.csv",
}


def _epilog(name: str) -> str:
    text = EPILOGS[name]
    if name == "":
        return text
    return "examples:\n" + "\n".join("  " + line for line in text.splitlines())


def build_parser() -> argparse.ArgumentParser:
    from ZeroShotILDLib import __version__

    from . import reports

    parser = _new_parser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=_epilog(""))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress (bars on a terminal, one line per stage in a log)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log messages (-vv: debug)")
    sub = parser.add_subcommands(dest="command", required=True, title="commands", description=None)

    def add_command(name, help, *, under=None, epilog=None):
        """A command's parser, attached at once (jsonargparse adds nested commands level by level)."""
        command = _new_parser(description=help, epilog=_epilog(epilog or name))
        (under or sub).add_subcommand(name, command, help=help)
        command.prog = f"{(under or sub)._prog_prefix} {name}"  # jsonargparse writes "PROG [options] NAME"
        if name != "reader-study":
            _add_config_args(command)
        return command

    p = add_command("split", help="assign train/val/test by patient (never by scan)")
    p.add_argument("manifest")
    p.add_argument("--out", required=True, help="manifest to write (.csv or .jsonl)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of patients for validation (Van Uden et al. 2023: 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.0)
    p.add_argument("--stratify", metavar="LABEL",
                   help="keep each value of this label (ild, subtype or a label_<name> column) in the same "
                        "proportion in every split, patients kept whole (Van Uden et al. 2023 balanced its test set)")
    p.add_argument("--seed", type=int, default=0)

    p = add_command("preprocess", help="cache one montage per scan (resumable, --shard i/N for job arrays)")
    p.add_argument("manifest")
    p.add_argument("--cache", required=True, help="output folder of the montages (one folder per montage setting)")
    p.add_argument("--shard", default="0/1", help="this job's part i/N of the scans (e.g. $SLURM_ARRAY_TASK_ID/16)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes")
    _engine_settings_args(p)

    p = add_command("train", help="domain-adaptive pre-training (DAPT) on cached montages and reports")
    add_training_args(p)

    p = add_command("sweep", help="one training run per learning rate, best by validation loss")
    add_training_args(p)
    p.add_argument("--lrs", help="comma-separated learning rates (default: 5 log-spaced in [1e-5, 1e-3])")

    p = add_command("export", help="Lightning .ckpt -> engine checkpoint (safetensors)")
    p.add_argument("checkpoint", help="a run's checkpoints/last.ckpt")
    p.add_argument("--out", required=True, help="engine checkpoint to write (.safetensors)")
    g = p.add_argument_group("the run's settings (read from the run folder; give them for a .ckpt kept elsewhere)")
    g.add_argument("--model", help="base model the run trained (registry name, dapt:<checkpoint> or path)")
    g.add_argument("--base-checkpoint", help="weights file of that base model, if the run was given --checkpoint")
    g.add_argument("--weights-dir", help="folder where registry weights are looked for")
    g.add_argument("--loss", help="loss the run trained with (clip, relaxed, slip, uniclip, unicl, dlilp)")
    g.add_argument("--classes", help="comma-separated label classes of a unicl/dlilp run")

    for name, helptext in (("evaluate", "AUROC/AUPRC/F1 with bootstrap CIs, per subtype, ensembles, ROC/PR curves"),
                           ("grid", "retrieval x model x montage size x filter threshold (the tables of Van Uden et al. 2023)")):
        p = add_command(name, help=helptext)
        p.add_argument("manifest", help="labelled manifest (ild column; split column to pick test/val rows)")
        p.add_argument("--out", required=True)
        p.add_argument("--split", default="test", help="rows to evaluate (default test)")
        p.add_argument("--threshold-split", default="val",
                       help="rows that choose the F1 threshold (default val; 'none', or the evaluated split itself, "
                            "chooses it on the evaluated rows and labels F1/MCC optimistic)")
        p.add_argument("--label", default="ild", help="yes/no label to evaluate: ild or any label_<name> column (e.g. covid)")
        p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
        p.add_argument("--bootstrap", default="auto", choices=("auto", "patients", "images"),
                       help="resampled unit of the CIs: auto = patients when the manifest has patient ids "
                            "(images of one patient are not independent), else images")
        _add_pixel_spacing_arg(p)
        _engine_settings_args(p)
        if name == "evaluate":
            p.add_argument("--models", action="append", metavar="MODEL",
                           help="model to evaluate, repeatable (default --model); dapt:<ckpt> uses the DAPT model "
                           "to pick the patches and to classify (the best configuration of Van Uden et al. 2023)")
            p.add_argument("--ensemble", action="append", metavar="ENSEMBLE_JSON",
                           help="a run's ensemble.json: average the probabilities of its top-k checkpoints")
            p.add_argument("--shard", help="score only part i/N of the scans into --out (shard_scores.json, no tables), "
                                           "e.g. $SLURM_ARRAY_TASK_ID/16; combine with --merge-shards")
            p.add_argument("--merge-shards", nargs="+", metavar="SHARD_DIR",
                           help="the --out folders of every shard: checks all N are there and of this evaluation, then "
                                "writes the tables exactly as one unsharded run would")
        else:
            p.add_argument("--retrievals", help="comma list of clip,random")
            p.add_argument("--models", help="comma list of models (registry names, dapt:<ckpt>)")
            p.add_argument("--montage-sizes", help="comma list of 4,8,16")
            p.add_argument("--filter-thresholds", help="comma list, e.g. 0.2,0.5,0.8")

    p = add_command("reader-study", help="numbered montages for readers and ICC(3,1) of their counts")
    rs = p.add_subcommands(dest="action", required=True, title="actions", description=None)
    q = add_command("export", "write numbered montages and blank count sheets", under=rs, epilog="export-study")
    q.add_argument("manifest")
    q.add_argument("--out", required=True)
    q.add_argument("--methods", help="comma list of random,clip,dapt-clip (default: all available)")
    q.add_argument("--dapt-model", help="dapt:<ckpt> for the dapt-clip method")
    q.add_argument("--readers", help="comma list of reader codes (one sheet each)")
    q.add_argument("--blind", action="store_true", help="neutral image names, shuffled; key.csv maps them back")
    q.add_argument("--split", default="test", help="rows to export when the manifest has splits")
    q.add_argument("--label", default="ild", help="yes/no label that groups the scans (Positive/Negative): ild or any "
                                                   "label_<name> column")
    _add_pixel_spacing_arg(q)
    _engine_settings_args(q)
    q = add_command("analyze", "read filled sheets, write the reader-study table (Van Uden et al. 2023, Table 6)",
                    under=rs, epilog="analyze-study")
    q.add_argument("study", help="folder written by `reader-study export`")
    q.add_argument("sheets", nargs="+", help="filled count sheets (CSV)")
    q.add_argument("--out", required=True)
    q.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)

    p = add_command("probe", help="K-shot linear probing on frozen montage features, zero-shot, base/new "
                       "(Silva-Rodriguez et al. 2025)")
    p.add_argument("manifest")
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--label", default="subtype",
                   help="classes: subtype (no ild + subtypes), ild (yes/no) or any label_<name> column (yes/no)")
    p.add_argument("--k", type=int, default=16, help="cases per class (Silva-Rodriguez et al. 2025: 16)")
    p.add_argument("--repeats", type=int, default=5, help="K-shot draws (seeds)")
    p.add_argument("--base", help="comma list of base classes (seen in pre-training) for the base/new report")
    p.add_argument("--split", default="test", help="evaluation rows (train rows are probed on)")
    p.add_argument("--prompt", help="zero-shot text of the positive class of a yes/no label (default: the label name, "
                                    "'interstitial lung disease' for ild)")
    p.add_argument("--negative", help="zero-shot text of the negative class (default: 'no ' + the prompt)")
    _add_model_args(p)

    p = add_command("alignment", help="report- and sentence-level image-text cosine similarity (Jang et al. 2022)")
    p.add_argument("manifest")
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--text", dest="text_choice", default=DEFAULT_TEXT, choices=reports.TEXT_CHOICES,
                   help=f"report part (default {DEFAULT_TEXT}, the default recipe's, as for train)")
    p.add_argument("--split", default="test", help="rows to use when the manifest has splits")
    _add_model_args(p)

    p = add_command("runs", help="list the runs and evaluations under a results folder (their run.json; stdout only)")
    p.add_argument("root", help="folder holding run/evaluation folders")
    p.add_argument("--csv", action="store_true", help="CSV on stdout instead of aligned lines")

    p = add_command("preview-text", help="show what --text picks from the first reports of a manifest (stdout only)")
    p.add_argument("manifest")
    p.add_argument("--text", dest="text_choice", default=DEFAULT_TEXT, choices=reports.TEXT_CHOICES,
                   help=f"report part (default {DEFAULT_TEXT}, the default recipe's, as for train)")
    p.add_argument("-n", "--rows", type=int, default=3, help="reports shown (default 3; counts cover every row)")
    return parser



#: Keys of a parsed command line that are never settings of a run.
_CONFIG_EXCLUDED = {"command", "action", "config", "print_config", "help", "verbose", "version"}


def _config_first(parser, argv: list) -> list:
    """argv with each ``--config FILE`` moved to just after the command's name, so that every flag on
    the command line wins over the file wherever it is written (jsonargparse applies them in order).

    Each file first passes the engine's checks (size, UTF-8, YAML syntax, nesting depth; one line
    each, README "--config FILE"); jsonargparse then reads it and checks every key and value."""
    from ZeroShotILDLib.settings import read_config_file

    node, at = parser, None
    for i, token in enumerate(argv):
        subs = node._subcommands_action
        if subs is None:
            break
        if token in subs.choices:
            node, at = subs.choices[token], i + 1
    if at is None:
        return argv
    configs, rest, tail, i = [], [], argv[at:], 0
    while i < len(tail):
        if tail[i] == "--config" and i + 1 < len(tail):
            read_config_file(tail[i + 1])
            configs += tail[i:i + 2]
            i += 2
            continue
        if tail[i].startswith("--config="):
            read_config_file(tail[i].split("=", 1)[1])
            configs.append(tail[i])
        else:
            rest.append(tail[i])
        i += 1
    return argv[:at] + configs + rest


def _command(parser, cfg) -> tuple:
    """(the command's parser, its part of the parsed config, its name, e.g. "reader-study export")."""
    node, part, names = parser, cfg, []
    while node._subcommands_action is not None:
        name = part[node._subcommands_action.dest]
        names.append(name)
        node, part = node._subcommands_action.choices[name], part[name]
    return node, part, " ".join(names)


def _flatten(parser, cfg) -> argparse.Namespace:
    """One flat namespace: the top-level options, the command's name(s) and its options (which win)."""
    args = argparse.Namespace()
    node, part = parser, cfg
    while True:
        sub = node._subcommands_action
        chosen = part[sub.dest] if sub is not None else None
        for key, value in part.__dict__.items():
            if key != chosen:
                setattr(args, key, value)
        if sub is None:
            return args
        node, part = sub.choices[chosen], part[chosen]


def _parse(parser, argv: Sequence[str]):
    """Parse ``argv`` (jsonargparse: flags, --config files, types); one line (InputError) for what is wrong."""
    from jsonargparse import ArgumentError

    try:
        return parser.parse_args(_config_first(parser, list(argv)))
    except (ArgumentError, argparse.ArgumentError) as exc:
        message = " ".join(str(exc).split())  # jsonargparse's messages span lines; an error here is one
        command = " ".join(t for t in argv if t in _command_names(parser))
        message = _flag_names(parser, message)
        raise InputError(f"{message} (see `{PROG}{' ' + command if command else ''} --help`)") from None


def _flag_names(parser, message: str) -> str:
    """jsonargparse's keys in an error message as the flags a user typed: ``Parser key "lr"`` and
    ``train.cache`` become ``--lr`` and ``--cache``; ``<class 'float'>`` becomes ``float``."""
    import re

    flags, todo = {}, [parser]
    while todo:
        node = todo.pop()
        for action in node._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if longs:
                flags.setdefault(action.dest, longs[0])
        if node._subcommands_action is not None:
            todo.extend(node._subcommands_action.choices.values())

    def flag(match):
        key = match.group(1).rsplit(".", 1)[-1]
        return flags.get(key, key)

    message = re.sub(r'Parser key "([\w.-]+)"', flag, message)
    message = re.sub(r"<class '(\w+)'>", r"\1", message)
    names = "|".join(re.escape(n) for n in _command_names(parser))
    return re.sub(rf"\b(?:(?:{names})\.)+([\w]+)\b", flag, message) if names else message


def _command_names(parser) -> set:
    names, todo = set(), [parser]
    while todo:
        sub = todo.pop()._subcommands_action
        if sub is not None:
            names.update(sub.choices)
            todo.extend(sub.choices.values())
    return names


def _print_config(parser, cfg) -> int:
    """The command's effective settings as YAML, with jsonargparse's dump (so it reads back as --config);
    ``--text``/``--sentences`` left to the recipe are printed as the recipe sets them."""
    command, part, name = _command(parser, cfg)
    part = part.clone()
    for key in ("print_config", "config"):
        part.pop(key, None)
    if name in ("train", "sweep"):
        apply_recipe(part)
    print(command.dump(part, skip_validation=True, skip_unset=False), end="")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = sum(a.count("v") for a in argv if a.startswith("-") and not a.startswith("--") and set(a[1:]) == {"v"})
    verbose += argv.count("--verbose")
    logging.basicConfig(level=log_level(verbose), format=f"{PROG}: %(message)s")
    quiet_itk()
    try:
        parser = build_parser()
        cfg = _parse(parser, argv)
    except InputError as exc:  # a wrong flag or --config file; or the optional training dependencies missing
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    if _command(parser, cfg)[1].get("print_config"):
        return _print_config(parser, cfg)
    args = _flatten(parser, cfg)
    progress = TqdmProgress(enabled=not args.quiet, prog=PROG)
    try:
        code = _run_command(args, progress)
        _record_run(args, argv, code)
        return code
    except InputError as exc:
        progress.close()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except (Cancelled, KeyboardInterrupt):
        progress.close()
        print(f"{PROG}: cancelled; finished outputs kept, nothing half-written", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        progress.close()
        finish_all()  # record what this command wrote into its --out (training.files)


def _record_run(args, argv: Sequence[str], code: int) -> None:
    """``run.json`` + ``config.yaml`` in a finished command's ``--out`` folder and a row in the index above
    it (``training.run_record``); rank 0 of a multi-process run only."""
    from . import run_record

    out = getattr(args, "out", None)
    if code not in (0, EXIT_PARTIAL) or not out or not Path(out).expanduser().is_dir():
        return
    if int(os.environ.get("RANK", "0") or 0) != 0 or int(os.environ.get("LOCAL_RANK", "0") or 0) != 0:
        return
    command = args.command + (f" {args.action}" if getattr(args, "action", None) else "")
    settings = {k: v for k, v in vars(args).items() if k not in _CONFIG_EXCLUDED and not k.startswith("_")}
    try:
        run_record.write_run_record(Path(out), command, argv, settings, exit_code=code,
                                    headline=getattr(args, "_headline", ""))
    except OSError as exc:  # the results are written; a missing record is not worth failing them for
        log.warning("no run record in %s (%s)", out, exc)


def _run_command(args, progress) -> int:
    if args.command == "preprocess":
        return _cmd_preprocess(args, progress)
    if args.command == "reader-study":
        return _cmd_reader_export(args) if args.action == "export" else _cmd_reader_analyze(args)
    commands = {"split": _cmd_split, "train": _cmd_train, "sweep": _cmd_sweep, "export": _cmd_export,
                "evaluate": _cmd_evaluate, "grid": _cmd_grid, "probe": _cmd_probe, "preview-text": _cmd_preview_text,
                "runs": _cmd_runs}
    return commands.get(args.command, _cmd_alignment)(args)


if __name__ == "__main__":
    sys.exit(main())
