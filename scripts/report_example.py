"""docs/report_example.png: the report of the demo phantom, read as a DICOM series, rendered by headless Chromium.

    .venv/bin/python scripts/report_example.py [--keep DIR]

The demo's phantom (seed 7, 120 x 256 x 256, IPF) is written as a DICOM CT series (Instance Numbers from 1,
as a scanner numbers them) so that the key images show the PACS caption (image number and z), then
analysed with the shipped phantom-demo model exactly as ``zeroshot-ild analyze`` does, and report.html is
screenshotted with the network blocked. Synthetic data only: nothing of ../shared/data ends up in docs/.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_series(folder: Path, scan) -> None:
    import SimpleITK as sitk

    folder.mkdir(parents=True)
    d = np.asarray(scan.direction).reshape(3, 3)
    orientation = "\\".join(f"{v:.6f}" for v in list(d[:, 0]) + list(d[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    root = "1.2.826.0.1.3680043.8.498.77"
    for k in range(scan.hu.shape[0]):
        image = sitk.GetImageFromArray(np.ascontiguousarray(scan.hu[k], dtype=np.int16))
        image.SetSpacing(tuple(float(v) for v in scan.spacing_mm[:2]))
        position = np.asarray(scan.origin_mm) + d[:, 2] * k * scan.spacing_mm[2]
        # Instance Numbers run head to foot, as most scanners number an axial series (the array runs foot to head).
        for key, value in {"0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0020|000d": f"{root}.1",
                           "0020|000e": f"{root}.2", "0020|0052": f"{root}.3", "0008|0018": f"{root}.2.{k + 1}",
                           "0020|0013": str(scan.hu.shape[0] - k), "0010|0010": "Phantom^Demo",
                           "0010|0020": "PHANTOM-7", "0020|0032": "\\".join(f"{v:.4f}" for v in position),
                           "0020|0037": orientation, "0018|0050": f"{scan.spacing_mm[2]:g}", "0028|1052": "-1024",
                           "0028|1053": "1"}.items():
            image.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{k + 1:04d}.dcm"))
        writer.Execute(image)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="keep the series and the result in this folder")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        print("report_example: no headless browser (apt-get install chromium)", file=sys.stderr)
        return 2
    from PIL import Image

    from ZeroShotILDLib.cli import main as cli_main
    from ZeroShotILDLib.phantom import generate_phantom
    from ZeroShotILDLib.scan import scan_from_array

    work = args.keep or Path(tempfile.mkdtemp(prefix="zsild-report-"))
    phantom = generate_phantom(7, shape_zyx=(120, 256, 256), spacing_mm=(1.4, 1.4, 2.5),
                               subtype="idiopathic pulmonary fibrosis")
    scan = scan_from_array(phantom.hu, phantom.spacing_mm, phantom.origin_mm, phantom.direction, source="phantom")
    write_series(work / "phantom_dicom", scan)
    code = cli_main(["analyze", str(work / "phantom_dicom"), "-o", str(work / "result"), "--model", "phantom-demo",
                     "--overwrite", "-q"])
    if code != 0:
        return code
    shot = work / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1120,2200", f"--screenshot={shot}",
                    (work / "result" / "report.html").as_uri()], check=True, capture_output=True, timeout=180)
    image = Image.open(shot).convert("RGB")
    # Crop the page's grey background below the report.
    rows = np.flatnonzero((np.asarray(image) != np.array([0xf3, 0xf4, 0xf6])).any(axis=2).any(axis=1))
    image = image.crop((0, 0, image.width, int(rows[-1]) + 1 if rows.size else image.height))
    image.save(ROOT / "docs" / "report_example.png", optimize=True)
    print(f"wrote docs/report_example.png ({image.width} x {image.height})")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
