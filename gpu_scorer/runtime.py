"""ONNX Runtime serving of an exported scorer: provider chosen on purpose, stated, never silent.

``device``:

- ``"cpu"``: the CPU execution provider.
- ``"cuda"``: the CUDA execution provider, or :class:`ScorerDeviceError` when it cannot run
  (no driver, no device, missing CUDA/cuDNN libraries). onnxruntime-gpu lists
  ``CUDAExecutionProvider`` as *available* even on a machine without a GPU and, asked for
  it, quietly builds a CPU session; so we check ``session.get_providers()`` after creation.
- ``"auto"``: CUDA if that check passes, else CPU; the choice and the reason are logged
  (WARNING when a CUDA build runs on CPU), and ``.provider`` reports it for metrics labels.

On CUDA, inputs and outputs go through IO binding. Two options stay off by default because
they only pay on some GPUs/batches and could not be measured when this was written
(see docs/scorer.md): ``cuda_graph`` (captures the graph once for fixed padded shapes
``max_batch x max_len x max_cands``) and ``fp16`` (converts the weights to float16; inputs
and outputs stay int64/float32).

CPU: graph optimisations at ORT_ENABLE_ALL, ``intra_op_num_threads`` = usable cores capped
at 4 (``STREAMREC_SCORER_THREADS`` overrides), one inter-op thread, sequential execution;
thread spinning is off by default (``spin=True`` buys ~20% latency on an idle machine but
burns the cores the stream's event loop shares).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gpu_scorer import layout
from gpu_scorer.errors import ModelLoadError, ScorerDeviceError
from gpu_scorer.vocab import OOV_ROW, Vocab

log = logging.getLogger("gpu_scorer")

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")


def cuda_device_count() -> tuple[int, str]:
    """(number of CUDA devices the driver reports, reason when 0), without importing torch."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return 0, "no NVIDIA driver (libcuda) found"
    if lib.cuInit(0) != 0:
        return 0, "the NVIDIA driver failed to initialise (cuInit)"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "the NVIDIA driver reports no CUDA device"
    return count.value, ""


def cuda_unavailable() -> str | None:
    """Why the scorer cannot run on CUDA here (no driver or device, or an onnxruntime without
    its CUDA provider), or None when it may: a command asked for ``cuda`` refuses before its work,
    not when it loads the model at the end. Libraries missing at session time still show then."""
    n, reason = cuda_device_count()
    if n == 0:
        return reason
    if CUDA_EP not in ort.get_available_providers():
        return f"this onnxruntime build has no {CUDA_EP} (install onnxruntime-gpu)"
    return None


def default_threads() -> int:
    """``STREAMREC_SCORER_THREADS`` when it is a positive integer (the worker checks it at start:
    stream/settings.py), else half the usable cores, 1 to 4."""
    env = os.environ.get("STREAMREC_SCORER_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    # half the cores: the worker's other half runs Faust, the models and the broker's client
    # calls while the scorer works (2-core box, 25 users x 100 candidates: 1 thread 0.98 ms
    # a call, 2 threads 1.34 ms)
    return max(1, min(cores // 2, 4))


CPU_CHUNK = 64  # users per ONNX Runtime call on the CPU (see OnnxScorer.__init__)


def session_options(threads: int | None = None, spin: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    so.log_severity_level = 3  # ORT's own warnings; we state the provider ourselves
    return so


def _cuda_session(model, so: ort.SessionOptions, device_id: int, cuda_graph: bool) -> ort.InferenceSession:
    n, reason = cuda_device_count()
    if n == 0:
        raise ScorerDeviceError(reason)
    if CUDA_EP not in ort.get_available_providers():
        raise ScorerDeviceError(f"this onnxruntime build has no {CUDA_EP} (install onnxruntime-gpu)")
    if hasattr(ort, "preload_dlls"):
        try:  # CUDA/cuDNN from the nvidia-* wheels that torch brings
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - a failure shows up as a CPU-only session below
            log.debug("onnxruntime.preload_dlls failed: %s", exc)
    opts = {"enable_cuda_graph": "1" if cuda_graph else "0"}
    if device_id:
        # device 0 is the CUDA provider's default. Naming it makes ONNX Runtime 1.26+ log a
        # WARNING on every session ("No registered plugin EP device found for
        # 'CUDAExecutionProvider' with device_id=0") that says nothing about this provider.
        opts["device_id"] = str(device_id)
    try:
        sess = ort.InferenceSession(model, so, providers=[(CUDA_EP, opts), CPU_EP])
    except Exception as exc:
        raise ScorerDeviceError(f"creating a CUDA session failed: {exc}") from exc
    if sess.get_providers()[0] != CUDA_EP:
        missing = missing_cuda_libs()
        hint = f"missing {', '.join(missing)} (e.g. pip install nvidia-curand for libcurand)" if missing else "see onnxruntime.print_debug_info()"
        raise ScorerDeviceError(f"onnxruntime could not start {CUDA_EP} (session got {sess.get_providers()}): {hint}")
    return sess


def missing_cuda_libs() -> list[str]:
    """CUDA libraries the onnxruntime CUDA provider links against that cannot be loaded."""
    major = _ort_cuda_major()
    wanted = [f"libcudart.so.{major}", f"libcublas.so.{major}", f"libcublasLt.so.{major}", "libcurand.so.10", "libcudnn.so.9"]
    missing = []
    for name in wanted:
        try:
            ctypes.CDLL(name)
        except OSError:
            missing.append(name)
    return missing


def _ort_cuda_major() -> str:
    try:
        from onnxruntime.capi import build_and_package_info as info

        return str(getattr(info, "cuda_version", "12") or "12").split(".")[0]
    except ImportError:
        return "12"


def make_session(
    model: str | Path | bytes,
    device: str = "auto",
    *,
    threads: int | None = None,
    spin: bool = False,
    device_id: int = 0,
    cuda_graph: bool = False,
) -> ort.InferenceSession:
    """An InferenceSession on ``device`` (see the module docstring); raises, never falls back silently."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, saw {device!r}")
    model = str(model) if isinstance(model, Path) else model
    if isinstance(model, str) and not model.isascii():
        try:
            model.encode()
        except UnicodeEncodeError:  # a path of bytes that are not UTF-8, which ONNX Runtime cannot open: read here
            model = Path(model).read_bytes()
    so = session_options(threads, spin)
    if device in ("cuda", "auto"):
        try:
            return _cuda_session(model, so, device_id, cuda_graph)
        except ScorerDeviceError as exc:
            if device == "cuda":
                raise ScorerDeviceError(f"device='cuda' requested but {exc}; use device='cpu' or 'auto'") from exc
            log.warning("scorer: device='auto' and CUDA is not usable (%s); running on %s", exc, CPU_EP)
    return ort.InferenceSession(model, so, providers=[CPU_EP])


def session_factory(device: str = "auto", threads: int | None = None) -> Callable[[bytes], ort.InferenceSession]:
    """``make_session`` with these settings, for a model built in memory (the text model's graph)."""
    def make(model: bytes) -> ort.InferenceSession:
        # "auto" without a usable GPU: the CPU, without a second warning (the scorer's says it)
        wanted = "cpu" if device == "auto" and cuda_device_count()[0] == 0 else device
        return make_session(model, wanted, threads=threads)
    return make


def resolve_model_dir(model: str | Path, model_dir: str | Path | None = None) -> Path:
    """A version directory from a path (directory or model.onnx) or a version name/"latest"."""
    p = Path(model)
    if p.is_dir():
        return p
    if p.suffix == ".onnx" and p.is_file():
        return p.parent
    root = Path(model_dir) if model_dir is not None else layout.default_model_dir()  # a version name
    version = layout.latest(root) if str(model) == "latest" else str(model)
    if version is None:
        raise ModelLoadError(f"no model registered in {root}")
    return layout.version_path(root, version)


class OnnxScorer:
    """Scores candidates for users' item sequences with an exported model.

    ``model``: a version directory (``model.onnx`` + ``vocab.json``), a ``model.onnx`` path,
    a version name in ``model_dir`` (default ``$STREAMREC_MODEL_DIR`` or ``./models``) or
    ``"latest"``. Sequences are oldest-first; the last ``max_len`` items are used; an empty
    sequence is read as a single OOV item. Unknown items use the OOV row (see ``vocab.py``).
    """

    def __init__(
        self,
        model: str | Path,
        device: str = "auto",
        *,
        model_dir: str | Path | None = None,
        threads: int | None = None,
        spin: bool = False,
        io_binding: bool = True,
        cuda_graph: bool = False,
        fp16: bool = False,
        max_batch: int = 256,
        max_cands: int = 512,
        device_id: int = 0,
    ) -> None:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, saw {device!r}")
        self.path = resolve_model_dir(model, model_dir)
        onnx_path = self.path / "model.onnx"
        try:
            self.vocab = Vocab.load(self.path / "vocab.json")
            max_len = _manifest_max_len(self.path)  # None for a bare exported file
            blob: str | bytes = str(onnx_path)
            if fp16 or cuda_graph:
                max_len = max_len or _onnx_max_len(onnx_path)
                blob = _rewrite(onnx_path, fp16, (max_batch, max_len, max_cands) if cuda_graph else None)
            self.session = make_session(blob, device, threads=threads, spin=spin, device_id=device_id, cuda_graph=cuda_graph)
            self.max_len: int = max_len or _session_max_len(self.session)
            rows = self.session.get_modelmeta().custom_metadata_map.get("n_items")  # export.py writes it
            if rows is not None and int(rows) != len(self.vocab):  # an id past the table fails every call
                raise ModelLoadError(f"vocab.json has {len(self.vocab)} rows, the model's item table {rows}: they "
                                     "are not of the same training")
        except (ScorerDeviceError, ModelLoadError):
            raise
        except Exception as exc:
            raise ModelLoadError(f"cannot load the model in {self.path}: {exc}") from exc
        self.provider: str = self.session.get_providers()[0]
        self.version: str = self.path.name
        self.max_batch, self.max_cands = max_batch, max_cands
        # users per call on the CPU: a bigger call costs more per user once its activations
        # leave the cache (1 thread, 100 candidates: 43 µs a user at 64, 59-75 at 256)
        self._chunk = max_batch if self.provider == CUDA_EP else min(max_batch, CPU_CHUNK)
        self.device_id = device_id
        on_cuda = self.provider == CUDA_EP
        self._binding = _CudaBinding(self, cuda_graph) if on_cuda and (io_binding or cuda_graph) else None
        log.info("scorer %s running on %s", self.version, self.provider)

    def run_ids(self, seq_ids: np.ndarray, cand_ids: np.ndarray) -> np.ndarray:
        """Raw call on padded id arrays (int64 [B, L] left-padded, int64 [B, C]) -> [B, C]."""
        if self._binding is not None:
            return self._binding.run(seq_ids, cand_ids)
        return self.session.run(["scores"], {"seq_ids": seq_ids, "cand_ids": cand_ids})[0]

    def encode(self, sequences: Sequence[Sequence[str]], candidates: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        if len(sequences) != len(candidates):
            raise ValueError(f"{len(sequences)} sequences but {len(candidates)} candidate lists")
        rows = self.vocab.rows
        seqs = [rows(s[-self.max_len :]) or [OOV_ROW] for s in sequences]
        width = max((len(s) for s in seqs), default=1)
        c = max((len(x) for x in candidates), default=1) or 1
        seq_ids = np.zeros((len(seqs), width), dtype=np.int64)
        cand_ids = np.zeros((len(seqs), c), dtype=np.int64)
        for i, s in enumerate(seqs):
            seq_ids[i, width - len(s) :] = s
            cand_ids[i, : len(candidates[i])] = rows(candidates[i])
        return seq_ids, cand_ids, [len(x) for x in candidates]

    def score(self, sequences: Sequence[Sequence[str]], candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Per user, float32 scores aligned with its candidate list (ragged lists are fine)."""
        out: list[np.ndarray] = []
        chunk = self._chunk
        for lo in range(0, len(sequences), chunk):
            seqs, cands = sequences[lo : lo + chunk], candidates[lo : lo + chunk]
            seq_ids, cand_ids, lengths = self.encode(seqs, cands)
            scores = self.run_ids(seq_ids, cand_ids)
            out.extend(np.array(scores[i, :n], dtype=np.float32) for i, n in enumerate(lengths))
        return out

    def __repr__(self) -> str:
        return f"OnnxScorer(version={self.version!r}, provider={self.provider!r})"


class _CudaBinding:
    """IO binding on CUDA: inputs copied once per call, output left on the device until read.
    With ``cuda_graph`` the shapes are fixed (padded to max_batch x max_len x max_cands) and
    the buffers are allocated once, as CUDA graph replay requires."""

    def __init__(self, scorer: OnnxScorer, cuda_graph: bool, device_type: str = "cuda") -> None:
        self.sess, self.dev, self.kind = scorer.session, scorer.device_id, device_type  # "cpu": tests
        self.cuda_graph = cuda_graph
        self.lock = threading.Lock()  # the captured graph's buffers are shared: one call at a time
        if cuda_graph:
            self.io = self.sess.io_binding()
            b, sl, c = scorer.max_batch, scorer.max_len, scorer.max_cands
            self.shape = (b, sl, c)
            self.seq = ort.OrtValue.ortvalue_from_shape_and_type((b, sl), np.int64, self.kind, self.dev)
            self.cand = ort.OrtValue.ortvalue_from_shape_and_type((b, c), np.int64, self.kind, self.dev)
            self.out = ort.OrtValue.ortvalue_from_shape_and_type((b, c), np.float32, self.kind, self.dev)
            self.io.bind_ortvalue_input("seq_ids", self.seq)
            self.io.bind_ortvalue_input("cand_ids", self.cand)
            self.io.bind_ortvalue_output("scores", self.out)

    def run(self, seq_ids: np.ndarray, cand_ids: np.ndarray) -> np.ndarray:
        if not self.cuda_graph:  # a binding per call: session.run is thread-safe, a shared binding is not
            io = self.sess.io_binding()
            io.bind_ortvalue_input("seq_ids", ort.OrtValue.ortvalue_from_numpy(seq_ids, self.kind, self.dev))
            io.bind_ortvalue_input("cand_ids", ort.OrtValue.ortvalue_from_numpy(cand_ids, self.kind, self.dev))
            io.bind_output("scores", self.kind, self.dev)
            self.sess.run_with_iobinding(io)
            return io.copy_outputs_to_cpu()[0]
        b, width, c = self.shape
        n, sl, nc = seq_ids.shape[0], seq_ids.shape[1], cand_ids.shape[1]
        if n > b or sl > width or nc > c:
            raise ValueError(f"batch {seq_ids.shape}x{nc} exceeds the CUDA graph shape {self.shape}")
        seq = np.zeros((b, width), np.int64)
        seq[:n, width - sl :] = seq_ids
        seq[n:, -1] = OOV_ROW  # padding users get one token so no row is fully masked
        cand = np.zeros((b, c), np.int64)
        cand[:n, :nc] = cand_ids
        with self.lock:
            self.seq.update_inplace(seq)
            self.cand.update_inplace(cand)
            self.sess.run_with_iobinding(self.io)
            return self.out.numpy()[:n, :nc].copy()


# The model's max_len: the registered config (manifest.json), else the exported file's metadata
# (export.py writes it), else 50. Read through ONNX Runtime, so that serving needs no onnx package.


def _manifest_max_len(path: Path) -> int | None:
    if not (path / layout.MANIFEST).exists():
        return None
    max_len = layout.read_manifest(path).get("config", {}).get("max_len")
    return int(max_len) if max_len is not None else None


def _session_max_len(session: ort.InferenceSession) -> int:
    return int(session.get_modelmeta().custom_metadata_map.get("max_len", 50))


def _onnx_max_len(onnx_path: Path) -> int:
    import onnx  # only the fp16 and CUDA-graph rewrites need it here

    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    return int(meta.get("max_len", 50))


def _rewrite(onnx_path: Path, fp16: bool, static: tuple[int, int, int] | None) -> bytes:
    """fp16 weights (I/O stay int64/float32) and/or fixed input shapes: CUDA graphs need every
    node on the GPU, and with static shapes ORT folds the Shape/Gather arithmetic that it
    would otherwise place on the CPU. Needs the onnx package (a core dependency)."""
    import onnx

    model = onnx.load(str(onnx_path))
    if static is not None:
        b, sl, c = static
        shapes = {"seq_ids": (b, sl), "cand_ids": (b, c), "scores": (b, c)}
        for vi in [*model.graph.input, *model.graph.output]:
            for dim, value in zip(vi.type.tensor_type.shape.dim, shapes[vi.name], strict=True):
                dim.ClearField("dim_param")
                dim.dim_value = value
    if fp16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True)
    return model.SerializeToString()


__all__ = ["CPU_EP", "CUDA_EP", "DEVICES", "OnnxScorer", "cuda_device_count", "cuda_unavailable", "make_session", "session_options"]
