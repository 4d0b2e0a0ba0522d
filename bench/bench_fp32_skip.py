"""One fast-mode run of the reference without native bf16 at a given fp32 skip distance (issue 13).

Times read -> outputs, counts the encodings, and checks the found top-16 for the default prompt
against exact mode's, taken from bench_fp32_search.py's dump of the same reference (its
``--dump-dir``). Run it alternating between distances, since these machines are noisy:

    for k in 4 1 4 1; do ONEDNN_MAX_CPU_ISA=AVX2 ZEROSHOT_ILD_CPU_BF16=0 OMP_NUM_THREADS=2 \
        .venv/bin/python bench/bench_fp32_skip.py $k /tmp/fp32-search; done
"""
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from bench.bench_fp32_search import exact_top, load  # noqa: E402
from ZeroShotILDLib.models import load_model  # noqa: E402
from ZeroShotILDLib.outputs import write_outputs  # noqa: E402
from ZeroShotILDLib.pipeline import Analyzer  # noqa: E402
from ZeroShotILDLib.scan import read_scan  # noqa: E402
from ZeroShotILDLib.settings import AnalysisSettings  # noqa: E402

torch.set_num_threads(2)
skip = float(sys.argv[1])
dump_dir = Path(sys.argv[2])
features, *_, texts = load(dump_dir / "vit-b-32-random-phantom11.npz")
want = exact_top(features, texts[0])  # the default prompt's exact top-16
model = load_model("vit-b-32-random")
s = AnalysisSettings(model="vit-b-32-random", montage_size=4, filter_threshold=0.5, top_k=16, scoring_mode="fast", fp32_skip_within_mm=skip).validate()
t = time.perf_counter()
scan = read_scan(dump_dir / "phantom11.nii.gz")
r = Analyzer(s, model=model).analyze(scan)
write_outputs(r, scan, dump_dir / f"out-skip{skip:g}")
print(f"skip {skip}: {time.perf_counter() - t:.1f} s, encoded {r.encoded_exactly}/{len(r.patches)}, kept {len(want & set(r.ranked[:16].tolist()))}/16, peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GB", flush=True)
