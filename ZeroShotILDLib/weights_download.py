"""``zeroshot-ild models download NAME``: openly licensed weights in one step, through the hub's own client.

Each downloadable model lists, in ``model_list.json``, the hub repositories it needs with a pinned
revision (a commit, never a branch) and the files to take. ``huggingface_hub`` does the transfer:
it resumes an interrupted download from its ``.incomplete`` file, honours ``HF_ENDPOINT`` (a mirror,
or the loopback server of the tests) and ``HF_HUB_OFFLINE``. Every file with a published SHA-256 is
checked after the transfer and deleted again when it does not match, so a damaged or substituted file
never stays under the name the loader looks for. CheXzero's weights sit behind a credentialed licence
and no hub: for it the command prints the steps instead.

Unverified: the repository ids, revisions and file names in ``model_list.json`` were taken from public
references (code and caches that name these snapshots) while this project had no access to the hub,
so none was checked against it. A wrong one fails in one line (no such revision or file); a wrong
file can never be accepted where a SHA-256 is published (clip-vit-b-32-laion, openai-vit-b-32).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

from .errors import InputError
from .model_registry import ModelSpec, get_spec, list_models, weights_root

#: Printed by ``zeroshot-ild models download chexzero``: the weights cannot be fetched for the user.
CHEXZERO_STEPS = """\
CheXzero's weights cannot be downloaded by this tool: they are fine-tuned on MIMIC-CXR, whose
PhysioNet credentialed licence (and data use agreement) binds their use. To use them:
  1. Read the licence and the weights link in https://github.com/rajpurkarlab/CheXzero (README,
     "Zero-shot inference"); the code is MIT, the checkpoints follow the MIMIC-CXR terms.
  2. Download one checkpoint, e.g. best_64_5e-05_original_22000_0.864.pt (the ten published
     checkpoints have SHA-256 values in ZeroShotILDLib/model_list.json; a file with another hash is
     refused).
  3. Put it in {folder}/  (or pass --checkpoint FILE to analyze).
  4. Check: zeroshot-ild models   (chexzero: found, checksum ok)
Without it, an openly licensed model works at once, e.g.:
  zeroshot-ild models download clip-vit-b-32-laion
  zeroshot-ild analyze SCAN -o OUT --model clip-vit-b-32-laion"""

Log = Callable[[str], None]


def downloadable_models() -> list[str]:
    return [s.name for s in list_models() if s.download]


def _endpoint() -> Optional[str]:
    # Read at call time: huggingface_hub reads HF_ENDPOINT once, when first imported (open_clip
    # may have imported it long before), so the value is passed explicitly.
    return os.environ.get("HF_ENDPOINT") or None


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _unreachable(endpoint: str, timeout_s: float = 3.0) -> Optional[str]:
    """Why ``endpoint`` cannot be reached (a short reason), or None when a TCP connection opens.

    The hub client retries an unreachable host for ~25 s with a warning per try; a plain connection
    attempt first turns "offline" into one line at once. Behind a proxy the proxy decides, so the
    probe is skipped there.
    """
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except socket.gaierror:
        return f"cannot resolve {host}"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def _offline_message(spec: ModelSpec, target: Path, endpoint: str, detail: str) -> str:
    return (f"cannot download '{spec.name}': {endpoint} is not reachable ({detail}); on a computer with internet "
            f"run `zeroshot-ild models download {spec.name} --weights-dir DIR` and copy DIR/{spec.name}/ to {target}/")


def download_model(name: str, weights_dir: Optional[os.PathLike] = None, *, log: Log = print,
                   progress_bars: Optional[bool] = None, progress=None) -> Path:
    """Fetch the weights of registry model ``name`` into ``weights_dir/<name>/``; return that folder.

    ``progress(stage, done_mb, total_mb)`` (the engine's progress callback) is called about twice a
    second during each transfer (the Slicer worker forwards it to the panel's progress bar).

    Raises ``InputError`` (one line) for a model that cannot be downloaded, an unreachable hub,
    a missing file or a SHA-256 that does not match the published one (the file is then removed).
    """
    spec = get_spec(name)
    root = weights_root(weights_dir)
    target = root / spec.name
    if not spec.download:
        if spec.name == "chexzero":
            raise InputError("CheXzero's weights are not downloadable (credentialed licence): "
                             "`zeroshot-ild models download chexzero` prints the steps")
        if spec.source in ("random", "package"):
            raise InputError(f"'{spec.name}' needs no download: " + spec.how_to_obtain)
        raise InputError(f"'{spec.name}' cannot be downloaded by this tool: " + spec.how_to_obtain.format(weights_dir=root))
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    except ImportError:  # pragma: no cover - a dependency of open_clip_torch
        raise InputError("downloading needs huggingface_hub: pip install huggingface_hub") from None
    endpoint = _endpoint() or "https://huggingface.co"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise InputError(_offline_message(spec, target, endpoint, "HF_HUB_OFFLINE is set"))
    reason = _unreachable(endpoint)
    if reason:
        raise InputError(_offline_message(spec, target, endpoint, reason))
    if progress_bars is None:
        progress_bars = sys.stderr.isatty()
    was_disabled = are_progress_bars_disabled()
    if not progress_bars:
        disable_progress_bars()
    # The client's own retry warnings ("Retrying in 8s ...") would interleave with our one-line messages.
    hub_log = logging.getLogger("huggingface_hub")
    hub_level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        for part in spec.download:
            folder = target / part.get("subdir", "") if part.get("subdir") else target
            folder.mkdir(parents=True, exist_ok=True)
            repo, revision = part["repo_id"], part["revision"]
            files = part.get("files")
            try:
                if files:
                    for filename in files:
                        _fetch_file(spec, repo, revision, filename, folder, endpoint, log, progress)
                else:
                    log(f"downloading {repo}@{revision[:12]} ({', '.join(part.get('patterns') or ['all files'])}) "
                        f"-> {folder}")
                    huggingface_hub.snapshot_download(repo, revision=revision, local_dir=folder,
                                                      allow_patterns=part.get("patterns"), endpoint=_endpoint())
            except InputError:
                raise
            except hub_errors.OfflineModeIsEnabled:
                raise InputError(_offline_message(spec, target, endpoint, "HF_HUB_OFFLINE is set")) from None
            except (hub_errors.RevisionNotFoundError, hub_errors.RemoteEntryNotFoundError) as exc:
                raise InputError(f"cannot download '{spec.name}': {repo} at revision {revision[:12]} has no such "
                                 f"file or revision ({_first_line(exc)}); the registry entry is out of date: download "
                                 f"by hand as `zeroshot-ild models` describes") from None
            except hub_errors.RepositoryNotFoundError as exc:
                raise InputError(f"cannot download '{spec.name}': repository {repo} not found or not public "
                                 f"({_first_line(exc)})") from None
            except hub_errors.LocalEntryNotFoundError as exc:
                # What the client raises when the HEAD request cannot reach the endpoint at all.
                raise InputError(_offline_message(spec, target, endpoint, _first_line(exc, 90))) from None
            except hub_errors.HfHubHTTPError as exc:
                raise InputError(f"cannot download '{spec.name}' from {endpoint}: {_first_line(exc)}") from None
            except OSError as exc:
                raise InputError(_offline_message(spec, target, endpoint, _first_line(exc, 90))) from None
            except Exception as exc:  # noqa: BLE001 - httpx connection errors and the like: one line, no traceback
                raise InputError(_offline_message(spec, target, endpoint, f"{type(exc).__name__}: "
                                                                          f"{_first_line(exc, 90)}")) from None
    finally:
        hub_log.setLevel(hub_level)
        if not progress_bars and not was_disabled:
            enable_progress_bars()
    return target


def _fetch_file(spec: ModelSpec, repo: str, revision: str, filename: str, folder: Path, endpoint: str,
                log: Log, progress=None) -> Path:
    """One file at the pinned revision into ``folder``, resumable across runs, then checked.

    The hub client's ``hf_hub_download`` no longer keeps a partial file between runs (it resumes only
    within one call), so the transfer uses the client's lower-level pieces instead: the metadata
    request (``get_hf_file_metadata``: size, ETag, redirects, HF_HUB_OFFLINE) and ``http_get``, which
    continues a file from a byte offset with a Range request and retries dropped connections. The
    bytes go to ``.<name>.<revision>.part`` beside the target, kept when the run is interrupted and
    continued by the next one; only a file whose SHA-256 matches is renamed to the name the loader
    looks for.
    """
    import huggingface_hub
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    from .file_hashes import sha256_file

    expected = (spec.sha256.get(Path(filename).name) or "").lower() or None
    path = folder / filename
    if path.is_file():
        if expected is None:
            log(f"{path}: already present (no published SHA-256 to check it against)")
            return path
        if sha256_file(path) == expected:
            log(f"{path}: already present, SHA-256 ok")
            return path
        log(f"{path}: SHA-256 does not match the published one; downloading it again")
    url = huggingface_hub.hf_hub_url(repo, filename, revision=revision, endpoint=_endpoint())
    meta = huggingface_hub.get_hf_file_metadata(url, endpoint=_endpoint())
    size = meta.size
    partial = path.with_name(f".{path.name}.{revision[:12]}.part")
    path.parent.mkdir(parents=True, exist_ok=True)
    done = partial.stat().st_size if partial.is_file() else 0
    if size is not None and done > size:
        partial.unlink()
        done = 0
    where = f"{repo}@{revision[:12]}/{filename}"
    mb = f" ({size / 1e6:.1f} MB)" if size else ""
    log(f"downloading {where}{mb} from {endpoint} -> {folder}" +
        (f", resuming at {done / 1e6:.1f} MB" if done else ""))
    with open(partial, "ab") as handle, _reporting(progress, f"downloading {filename}", partial, size):
        http_get(meta.location or url, handle, resume_size=done, expected_size=size,
                 headers=build_hf_headers(headers={"Accept-Encoding": "identity"}), displayed_filename=filename)
    found = sha256_file(partial)
    if expected is not None and found != expected:
        partial.unlink(missing_ok=True)
        raise InputError(f"downloaded {filename} of '{spec.name}' has SHA-256 {found}, but {expected} is published: "
                         "the file was removed; try again later or download it by hand and check it")
    os.replace(partial, path)
    if expected is None:
        log(f"{path}: no published SHA-256 for this file, not checked (its SHA-256 is {found})")
    else:
        log(f"{path}: SHA-256 ok")
    return path


@contextlib.contextmanager
def _reporting(progress, stage: str, partial: Path, size: Optional[int], every_s: float = 0.5):
    """Report the growing size of ``partial`` (in MB) to ``progress`` from a thread while the block runs."""
    if progress is None:
        yield
        return
    stop = threading.Event()
    total = int((size or 0) // 1_000_000)

    def report():
        while True:
            try:
                done = partial.stat().st_size
            except OSError:
                done = 0
            progress(stage, int(done // 1_000_000), total)
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=report, name="download-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    progress(stage, total, total)


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__
