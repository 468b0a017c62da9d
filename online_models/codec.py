"""Model state as data: a msgpack encoding of the learners' object graphs that runs no code.

A snapshot of the online models travels through Redis, which more processes can write than
should be able to run code in a worker. So snapshots are not pickles: :func:`encode` turns
an object graph into msgpack (msgspec), where plain values (strings, numbers, lists, dicts of
them) stay as they are and everything else is a tagged extension: numpy arrays as dtype,
shape and raw bytes; tuples, sets, deques and dicts with other keys by their items; random
generators by their state; and objects by class name and attributes. :func:`decode` rebuilds
only what it knows: numeric arrays, the containers above, and objects of classes that are
already imported from an allowed package (``online_models``, ``river``), by setting their
attributes (or with the class's own ``__setstate__``); a class from anywhere else, an
array of Python objects or an unknown tag is refused with :class:`CodecError`, and no
constructor, ``__reduce__`` or import runs on the way.

>>> import numpy as np
>>> from collections import deque
>>> value = {"scores": np.arange(3.0), "pair": ("a", 1), "seen": {"x"}, "window": deque([1, 2], maxlen=5)}
>>> back = decode(encode(value))
>>> back["scores"].tolist(), back["pair"], back["seen"], back["window"]
([0.0, 1.0, 2.0], ('a', 1), {'x'}, deque([1, 2], maxlen=5))
"""

from __future__ import annotations

import collections
import functools
import random
import sys
import threading
from typing import Any

import msgspec
import numpy as np

#: packages whose (already imported) classes a snapshot may name
ALLOWED_PACKAGES = ("online_models", "river")
_BUILTIN_CALLABLES = {f"builtins.{t.__qualname__}": t for t in (float, int, str, bool, list, dict, set, tuple, frozenset)}

# extension codes (msgpack ext types 1..127)
_NDARRAY, _TUPLE, _SET, _FROZENSET, _DEQUE, _PAIRS, _DEFAULTDICT, _ORDEREDDICT = 1, 2, 3, 4, 5, 6, 7, 8
_OBJECT, _CLASS, _PARTIAL, _RANDOM, _NP_RANDOMSTATE, _NP_GENERATOR, _NP_SCALAR, _VECTORDICT = 9, 10, 11, 12, 13, 14, 15, 16
_REF = 17  # an object written earlier in the same value: one object shared by two owners stays one
_BIGINT = 18  # an int beyond msgpack's 64 bits (a PCG64 generator's state), as its decimal text

# the objects of the value being written (id -> number) or read (number -> object), per thread
_memo = threading.local()

_SCALARS = frozenset({str, int, float, bool, type(None), bytes})
_SCALARS_BUT_INT = _SCALARS - {int}
_INT_RANGE = (-(2**63), 2**64 - 1)


class CodecError(ValueError):
    """State that :func:`encode` cannot write or :func:`decode` refuses to rebuild."""


def _plain(values) -> bool:
    scalars = _memo.scalars
    return all(type(v) in scalars for v in values)


def _pack(value: Any) -> bytes:
    return msgspec.msgpack.encode(value)


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _allowed(module: str) -> bool:
    return module.split(".", 1)[0] in ALLOWED_PACKAGES


def _enc(o: Any) -> Any:  # noqa: C901 - one branch per kind of value, in the order they are common
    t = type(o)
    if t is int and not _INT_RANGE[0] <= o <= _INT_RANGE[1]:
        return msgspec.msgpack.Ext(_BIGINT, _pack(str(o)))
    if t in _SCALARS:
        return o
    if t is dict:
        if all(type(k) is str for k in o):
            return o if _plain(o.values()) else {k: _enc(v) for k, v in o.items()}
        return msgspec.msgpack.Ext(_PAIRS, _pack([[_enc(k), _enc(v)] for k, v in o.items()]))
    if t is list:
        return o if _plain(o) else [_enc(v) for v in o]
    if t is np.ndarray:
        if o.dtype.hasobject:
            raise CodecError("an array of Python objects cannot be written as data")
        return msgspec.msgpack.Ext(_NDARRAY, _pack([o.dtype.str, list(o.shape), np.ascontiguousarray(o).tobytes()]))
    if t is tuple:
        return msgspec.msgpack.Ext(_TUPLE, _pack([_enc(v) for v in o]))
    if t is set or t is frozenset:
        return msgspec.msgpack.Ext(_SET if t is set else _FROZENSET, _pack([_enc(v) for v in o]))
    if t is collections.deque:
        return msgspec.msgpack.Ext(_DEQUE, _pack([o.maxlen, [_enc(v) for v in o]]))
    if t is collections.defaultdict:
        return msgspec.msgpack.Ext(_DEFAULTDICT, _pack([_enc(o.default_factory), [[_enc(k), _enc(v)] for k, v in o.items()]]))
    if t is collections.OrderedDict:
        return msgspec.msgpack.Ext(_ORDEREDDICT, _pack([[_enc(k), _enc(v)] for k, v in o.items()]))
    if isinstance(o, np.generic):
        return msgspec.msgpack.Ext(_NP_SCALAR, _pack([o.dtype.str, o.tobytes()]))
    if t is random.Random:
        return msgspec.msgpack.Ext(_RANDOM, _pack(_enc(o.getstate())))
    if t is np.random.RandomState:
        return msgspec.msgpack.Ext(_NP_RANDOMSTATE, _pack(_enc(o.get_state())))
    if t is np.random.Generator:
        return msgspec.msgpack.Ext(_NP_GENERATOR, _pack(_enc(o.bit_generator.state)))
    if t is functools.partial:
        return msgspec.msgpack.Ext(_PARTIAL, _pack([_enc(o.func), _enc(o.args), _enc(o.keywords)]))
    if isinstance(o, type):
        name = _name(o)
        if name not in _BUILTIN_CALLABLES and not _allowed(o.__module__):
            raise CodecError(f"class {name} is not one a snapshot may name")
        return msgspec.msgpack.Ext(_CLASS, _pack(name))
    if _name(t) == "river._river_rust.vectordict.VectorDict":
        return msgspec.msgpack.Ext(_VECTORDICT, _pack(_enc(o.to_dict())))
    if not _allowed(t.__module__):
        raise CodecError(f"a {_name(t)} cannot be written as data (only state of {', '.join(ALLOWED_PACKAGES)} classes)")
    seen = _memo.written
    number = seen.get(id(o))
    if number is not None:
        return msgspec.msgpack.Ext(_REF, _pack(number))
    number = seen[id(o)] = len(seen)
    _memo.keep.append(o)  # alive until the end, so that no id is reused meanwhile
    if t.__getstate__ is not object.__getstate__:
        state = o.__getstate__()
    elif hasattr(o, "__dict__"):
        state = o.__dict__
    else:
        raise CodecError(f"a {_name(t)} has no attributes to write")
    return msgspec.msgpack.Ext(_OBJECT, _pack([number, _name(t), _enc(state)]))


def encode(value: Any) -> bytes:
    """``value`` as msgpack bytes that :func:`decode` turns back into an equal value."""
    try:
        try:
            return _encode_with(value, _SCALARS)
        except OverflowError:  # an int beyond 64 bits in a plain list or dict: look at each int
            return _encode_with(value, _SCALARS_BUT_INT)
    except (TypeError, OverflowError) as exc:
        raise CodecError(f"cannot write the models as data: {exc}") from None


def _encode_with(value: Any, scalars: frozenset) -> bytes:
    _memo.written, _memo.keep, _memo.scalars = {}, [], scalars
    try:
        return _pack(_enc(value))
    finally:
        _memo.written, _memo.keep = {}, []


def _resolve(name: str) -> type:
    """The class ``module.qualname`` names: already imported, from an allowed package."""
    if name in _BUILTIN_CALLABLES:
        return _BUILTIN_CALLABLES[name]
    module_name, _, qualname = name.rpartition(".")
    while module_name and module_name not in sys.modules:  # a nested class: module.Outer.Inner
        module_name, _, outer = module_name.rpartition(".")
        qualname = f"{outer}.{qualname}"
    if not module_name or not _allowed(module_name):
        raise CodecError(f"the snapshot names class {name!r}, which is not one streamrec restores")
    obj: Any = sys.modules[module_name]
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type):
        raise CodecError(f"the snapshot names class {name!r}, which does not exist here")
    return obj


def _pairs(items) -> list[tuple[Any, Any]]:
    if not isinstance(items, list) or not all(isinstance(p, list) and len(p) == 2 for p in items):
        raise CodecError("malformed key-value pairs in the snapshot")
    return [(_hashable(k), v) for k, v in items]


def _hashable(key: Any) -> Any:
    try:
        hash(key)
    except TypeError:
        raise CodecError(f"a dict key of the snapshot is a {type(key).__name__}") from None
    return key


def _ext(code: int, data: memoryview) -> Any:  # noqa: C901 - one branch per tag
    inner = _decoder.decode(data)
    if code == _NDARRAY:
        dtype, shape, raw = inner
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise CodecError("the snapshot holds an array of Python objects")
        return np.frombuffer(raw, dtype=dt).reshape(shape).copy()
    if code == _TUPLE:
        return tuple(inner)
    if code == _SET:
        return {_hashable(v) for v in inner}
    if code == _FROZENSET:
        return frozenset(_hashable(v) for v in inner)
    if code == _DEQUE:
        maxlen, items = inner
        return collections.deque(items, maxlen=maxlen)
    if code == _PAIRS:
        return dict(_pairs(inner))
    if code == _DEFAULTDICT:
        factory, items = inner
        if factory is not None and not callable(factory):
            raise CodecError("a defaultdict of the snapshot has a factory that cannot be called")
        return collections.defaultdict(factory, _pairs(items))
    if code == _ORDEREDDICT:
        return collections.OrderedDict(_pairs(inner))
    if code == _NP_SCALAR:
        dtype, raw = inner
        return np.frombuffer(raw, dtype=np.dtype(dtype))[0]
    if code == _RANDOM:
        rng = random.Random()
        rng.setstate(inner)
        return rng
    if code == _NP_RANDOMSTATE:
        rs = np.random.RandomState()
        rs.set_state(inner)
        return rs
    if code == _NP_GENERATOR:
        bit_generator = getattr(np.random, str(inner.get("bit_generator")), None)
        if not (isinstance(bit_generator, type) and issubclass(bit_generator, np.random.BitGenerator)):
            raise CodecError(f"unknown random bit generator {inner.get('bit_generator')!r}")
        gen = bit_generator()
        gen.state = inner
        return np.random.Generator(gen)
    if code == _PARTIAL:
        func, args, keywords = inner
        if not callable(func):
            raise CodecError("a partial function of the snapshot wraps something that cannot be called")
        return functools.partial(func, *args, **keywords)
    if code == _CLASS:
        return _resolve(str(inner))
    if code == _VECTORDICT:
        from river.utils import VectorDict  # the type River's learners keep their weights in

        return VectorDict(inner)
    if code == _BIGINT:
        return int(str(inner)[:200])
    if code == _REF:
        read = _memo.read
        if not isinstance(inner, int) or inner not in read:
            raise CodecError("the snapshot refers to an object before (or inside) the object itself")
        return read[inner]
    if code == _OBJECT:
        number, name, state = inner
        cls = _resolve(name)
        obj = cls.__new__(cls)
        if "__setstate__" in _own_attrs(cls):
            obj.__setstate__(state)
        elif isinstance(state, dict) and all(type(k) is str for k in state):
            obj.__dict__.update(state)
        else:
            raise CodecError(f"the state of a {name} in the snapshot is not a dict of attributes")
        _memo.read[number] = obj
        return obj
    raise CodecError(f"unknown tag {code} in the snapshot")


@functools.cache
def _own_attrs(cls: type) -> frozenset[str]:
    """Attributes a class or one of its bases (other than ``object``) defines."""
    return frozenset(name for klass in cls.__mro__ if klass is not object for name in vars(klass))


_decoder = msgspec.msgpack.Decoder(ext_hook=_ext)


def decode(data: bytes | memoryview) -> Any:
    """The value :func:`encode` wrote; :class:`CodecError` for anything else."""
    _memo.read = {}
    try:
        return _decoder.decode(data)
    except CodecError:
        raise
    except (msgspec.DecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        raise CodecError(f"the snapshot's data does not decode: {type(exc).__name__}: {exc}") from None
    finally:
        _memo.read = {}


__all__ = ["ALLOWED_PACKAGES", "CodecError", "decode", "encode"]
