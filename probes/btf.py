"""Minimal reader of kernel BTF (``/sys/kernel/btf/vmlinux``) for load-time struct offsets.

Probes must be correct on kernels whose headers do not match (the machines build with 6.1 headers
against a 6.18 kernel), so every struct field a BPF program reads is located here, at load time,
from the running kernel's own type information and passed to the C code as a macro.

Only what the probes need is decoded: member offsets of named structs (following anonymous
struct/union members) and whether a kernel function exists (a helper's availability).
Format: Documentation/bpf/btf.rst (type section of ``struct btf_type`` records + string section).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

BTF_MAGIC = 0xEB9F

# BTF kinds (include/uapi/linux/btf.h) and the size of the data that follows each record.
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION = 1, 2, 3, 4, 5
KIND_ENUM, KIND_FWD, KIND_TYPEDEF = 6, 7, 8
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_DECL_TAG, KIND_ENUM64 = 12, 13, 14, 15, 17, 19
_FIXED_EXTRA = {KIND_INT: 4, KIND_ARRAY: 12, KIND_VAR: 4, KIND_DECL_TAG: 4}
_PER_MEMBER_EXTRA = {
    KIND_STRUCT: 12,
    KIND_UNION: 12,
    KIND_ENUM: 8,
    KIND_FUNC_PROTO: 8,
    KIND_DATASEC: 12,
    KIND_ENUM64: 12,
}
_MODIFIERS = {KIND_TYPEDEF, 9, 10, 11, 18}  # typedef, volatile, const, restrict, type_tag


class BTFError(Exception):
    """The BTF blob is missing, malformed, or lacks the type asked for."""


@dataclass(frozen=True)
class Member:
    """A struct member: byte offset from the start of the outer struct and byte size."""

    offset: int
    size: int


class BTF:
    """Parsed type index of one BTF blob (types are decoded lazily by id)."""

    def __init__(self, data: bytes) -> None:
        try:
            self._parse(data)
        except BTFError:
            raise
        except (struct.error, IndexError, ValueError) as e:  # truncated or garbled blob
            raise BTFError(f"malformed BTF: {type(e).__name__}: {e}") from e

    def _parse(self, data: bytes) -> None:
        if len(data) < 24:
            raise BTFError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BTFError(f"bad BTF magic {magic:#x}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._types_start = hdr_len + type_off
        self._types_end = self._types_start + type_len
        self._strings = data[hdr_len + str_off : hdr_len + str_off + str_len]
        self._pos: list[int] = [0]  # type id -> record offset; id 0 is void
        pos = self._types_start
        unpack = struct.unpack_from
        if self._types_end > len(data) or hdr_len + str_off + str_len > len(data):
            raise BTFError(f"BTF sections run past the blob's end ({len(data)} bytes)")
        while pos < self._types_end:
            self._pos.append(pos)
            info = unpack("<I", data, pos + 4)[0]
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            pos += 12 + _FIXED_EXTRA.get(kind, 0) + vlen * _PER_MEMBER_EXTRA.get(kind, 0)
        if pos != self._types_end:
            raise BTFError("BTF type section does not end on a record boundary")

    @classmethod
    def from_file(cls, path: str | Path = "/sys/kernel/btf/vmlinux") -> BTF:
        try:
            return cls(Path(path).read_bytes())
        except OSError as e:
            raise BTFError(f"cannot read {path}: {e.strerror}") from e

    def _name_offsets(self, name: str) -> set[int]:
        """All string-section offsets at which ``name`` is stored as a whole string."""
        needle = name.encode() + b"\0"
        found: set[int] = set()
        if self._strings.startswith(needle):
            found.add(0)
        start = 0
        while (i := self._strings.find(b"\0" + needle, start)) >= 0:
            found.add(i + 1)
            start = i + 1
        return found

    def _record(self, type_id: int) -> tuple[int, int, int, int, int]:
        """(name_off, kind, vlen, kind_flag, size_or_type) of a type id."""
        pos = self._pos[type_id]
        name_off, info, size_or_type = struct.unpack_from("<III", self._data, pos)
        return name_off, (info >> 24) & 0x1F, info & 0xFFFF, info >> 31, size_or_type

    @cached_property
    def _name_offs(self) -> np.ndarray:
        """Each type id's name offset (id 0: void, none), built at the first lookup: a lookup is
        then one vectorised compare instead of a walk over every record (126,669 types in a 6.18
        vmlinux; the walks took 0.5 s of a start with every probe)."""
        unpack = struct.unpack_from
        data = self._data
        offs = np.fromiter((unpack("<I", data, pos)[0] for pos in self._pos[1:]), np.uint32, len(self._pos) - 1)
        return np.concatenate([np.array([0xFFFFFFFF], np.uint32), offs])

    def _find(self, name: str, kinds: set[int]) -> int:
        offsets = self._name_offsets(name)
        if offsets:
            candidates = np.flatnonzero(np.isin(self._name_offs, np.fromiter(offsets, np.uint32, len(offsets))))
            for type_id in candidates.tolist():
                name_off, kind, vlen, _, _ = self._record(type_id)
                # A forward declaration or an empty struct is not the definition.
                if name_off in offsets and kind in kinds and (kind not in (KIND_STRUCT, KIND_UNION) or vlen):
                    return type_id
        raise BTFError(f"type {name!r} not found in BTF")

    def _string(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def _size_of(self, type_id: int) -> int:
        for _ in range(32):  # modifier chains are short; bound the walk anyway
            _, kind, _, _, size_or_type = self._record(type_id)
            if kind in _MODIFIERS:
                type_id = size_or_type
                continue
            if kind == KIND_PTR:
                return 8
            if kind == KIND_ARRAY:
                elem, _index, nelems = struct.unpack_from("<III", self._data, self._pos[type_id] + 12)
                return self._size_of(elem) * nelems
            return size_or_type
        raise BTFError(f"type chain too long at id {type_id}")

    def _members(self, type_id: int, base_bits: int = 0):
        """Yield (name, bit_offset, member_type_id), flattening anonymous struct/union members."""
        _, _, vlen, kind_flag, _ = self._record(type_id)
        pos = self._pos[type_id] + 12
        for i in range(vlen):
            name_off, mtype, offset = struct.unpack_from("<III", self._data, pos + 12 * i)
            bits = base_bits + ((offset & 0xFFFFFF) if kind_flag else offset)
            if name_off == 0:
                inner = self._strip(mtype)
                if self._record(inner)[1] in (KIND_STRUCT, KIND_UNION):
                    yield from self._members(inner, bits)
                continue
            yield self._string(name_off), bits, mtype

    def _strip(self, type_id: int) -> int:
        for _ in range(32):
            _, kind, _, _, size_or_type = self._record(type_id)
            if kind not in _MODIFIERS:
                return type_id
            type_id = size_or_type
        raise BTFError(f"type chain too long at id {type_id}")

    def member(self, struct_name: str, member: str) -> Member:
        """Offset and size of ``struct_name.member``; raises BTFError if absent or malformed."""
        return _guarded(self._member, struct_name, member)

    def _member(self, struct_name: str, member: str) -> Member:
        type_id = self._find(struct_name, {KIND_STRUCT})
        for name, bits, mtype in self._members(type_id):
            if name == member:
                if bits % 8:
                    raise BTFError(f"{struct_name}.{member} is a bitfield")
                return Member(bits // 8, self._size_of(mtype))
        raise BTFError(f"struct {struct_name} has no member {member!r}")

    def has_function(self, name: str) -> bool:
        """Whether the kernel has a function of this name (BTF FUNC record)."""
        try:
            _guarded(self._find, name, {KIND_FUNC})
        except BTFError:
            return False
        return True

    def function_id(self, name: str) -> int:
        """Type id of kernel function ``name``'s FUNC record (a tracing program's attach_btf_id)."""
        return _guarded(self._find, name, {KIND_FUNC})

    def function_params(self, name: str) -> tuple[str, ...]:
        """Parameter names of kernel function ``name``, in order (its FUNC record's FUNC_PROTO).
        fentry/fexit programs read argument i at ctx[i] and, in fexit, the return value after the
        last argument: the count decides where. Raises BTFError if the function is absent."""
        return _guarded(self._function_params, name)

    def _function_params(self, name: str) -> tuple[str, ...]:
        proto = self._record(self._find(name, {KIND_FUNC}))[4]
        _, kind, vlen, _, _ = self._record(proto)
        if kind != KIND_FUNC_PROTO:
            raise BTFError(f"function {name!r} has no prototype (kind {kind})")
        pos = self._pos[proto] + 12
        return tuple(self._string(struct.unpack_from("<I", self._data, pos + 8 * i)[0]) for i in range(vlen))

    def enum_value(self, enum_name: str, name: str) -> int:
        """Value of enumerator ``name`` of ``enum enum_name`` (e.g. cgroup_subsys_id.cpu_cgrp_id)."""
        return _guarded(self._enum_value, enum_name, name)

    def _enum_value(self, enum_name: str, name: str) -> int:
        type_id = self._find(enum_name, {KIND_ENUM, KIND_ENUM64})
        _, kind, vlen, kind_flag, _ = self._record(type_id)
        pos = self._pos[type_id] + 12
        for i in range(vlen):
            if kind == KIND_ENUM:
                name_off, value = struct.unpack_from("<Ii" if kind_flag else "<II", self._data, pos + 8 * i)
            else:
                name_off, lo, hi = struct.unpack_from("<III", self._data, pos + 12 * i)
                value = hi << 32 | lo
            if self._string(name_off) == name:
                return value
        raise BTFError(f"enum {enum_name} has no enumerator {name!r}")


def _guarded(fn, *args):
    """Run a lookup; a malformed blob surfaces as BTFError, never IndexError/struct.error."""
    try:
        return fn(*args)
    except BTFError:
        raise
    except (struct.error, IndexError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BTFError(f"malformed BTF: {type(e).__name__}: {e}") from e
