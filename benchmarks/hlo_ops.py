"""Per-op roofline of a compiled program, read from its optimised HLO text.

The TPU compiler reports one ``optimal_seconds`` for a whole program. To see where it goes, this
walks the entry computation's instructions (fusions, convolutions, custom calls, copies,
collectives), takes each one's HBM bytes (its operands and results) and FLOPs (the convolutions
and dots inside it, or a Pallas kernel's declared cost estimate), and prices it at
max(FLOPs / bf16 peak, bytes / HBM bandwidth) on the chip. Everything here is an estimate from
shapes: the sum is checked against the compiler's own figures where it is used.
"""

import dataclasses
import json
import math
import re
from collections import defaultdict

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(pred|[su](?:8|16|32|64)|bf16|f(?:16|32|64)|c64|c128|f8e4m3fn|f8e5m2)\[([0-9,]*)\]")
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
         "replica-id", "opt-barrier"}


@dataclasses.dataclass
class Op:
    name: str
    opcode: str
    bytes: float
    flops: float
    where: str  # the model path from the op's metadata (transforms stripped)
    kind: str  # conv, matmul, attention-kernel, elementwise/norm, copy, collective, other


def _shapes_bytes(text: str) -> int:
    return sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x) for d, dims in _SHAPE.findall(text))


def _dims(text: str) -> list[int]:
    m = _SHAPE.search(text)
    return [int(x) for x in m.group(2).split(",") if x] if m else []


def _split_computations(hlo: str) -> dict[str, list[str]]:
    comps, name, body = {}, None, []
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            name, body = ("ENTRY" if head.group(1) else head.group(2)), []
            comps[name] = body
        elif name is not None and line.startswith(" "):
            body.append(line.strip())
    return comps


def _instr(line: str):
    """(name, result text, opcode, operand text, attributes) of one HLO instruction line."""
    m = re.match(r"^(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$", line)
    if not m:
        return None
    name, result, opcode, rest = m.groups()
    depth, i = 1, 0
    while i < len(rest) and depth:
        depth += {"(": 1, ")": -1}.get(rest[i], 0)
        i += 1
    return name, result, opcode, rest[:i - 1], rest[i:]


def _conv_flops(result: str, operands: str, attrs: str) -> float:
    shapes = _SHAPE.findall(operands)
    if len(shapes) < 2:
        return 0.0
    rhs = [int(x) for x in shapes[1][1].split(",") if x]
    labels = re.search(r"dim_labels=\w+_(\w+)->", attrs)
    o = labels.group(1).index("o") if labels else len(rhs) - 1
    # Each output element takes the kernel's window x input features (already / groups) multiply-adds.
    return 2.0 * math.prod(_dims(result)) * math.prod(rhs) / rhs[o]


def _dot_flops(result: str, operands: str, attrs: str) -> float:
    lhs = _dims(operands)
    contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attrs)
    k = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i) if contracting else 1
    return 2.0 * math.prod(_dims(result)) * k


def _computation_flops(comps: dict, name: str, seen: set | None = None) -> float:
    seen = seen if seen is not None else set()
    if name in seen or name not in comps:
        return 0.0
    seen.add(name)
    total = 0.0
    for line in comps[name]:
        parsed = _instr(line)
        if not parsed:
            continue
        _, result, opcode, operands, attrs = parsed
        if opcode == "convolution":
            total += _conv_flops(result, operands, attrs)
        elif opcode == "dot":
            total += _dot_flops(result, operands, attrs)
        for callee in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", attrs):
            total += _computation_flops(comps, callee, seen)
    return total


def _where(attrs: str) -> str:
    m = re.search(r'op_name="([^"]*)"', attrs)
    if not m:
        return ""
    parts = [p for p in m.group(1).split("/") if not re.match(r"^(jit|jvp|transpose|vmap|remat|checkpoint|pjit|"
                                                              r"rematted_computation|shard_map)\b", p)]
    return "/".join(p for p in parts if not p.startswith(("jit(", "jvp(", "transpose(")))


def _kind(opcode: str, flops: float, attrs: str, has_conv: bool) -> str:
    if opcode == "custom-call":
        return "attention-kernel" if "tpu_custom_call" in attrs else "custom-call"
    if opcode in ("all-reduce", "all-reduce-start", "all-gather", "all-gather-start", "reduce-scatter",
                  "all-to-all", "collective-permute", "collective-permute-start"):
        return "collective"
    if opcode in ("copy", "copy-start", "transpose"):
        return "copy/transpose"
    if flops:
        return "conv" if has_conv else "matmul"
    return "elementwise/reduce"


def ops(hlo: str) -> list[Op]:
    """The entry computation's instructions (and those of the while loops and calls it runs) as Ops."""
    comps = _split_computations(hlo)
    out = []

    def walk(comp: str, seen: set):
        for line in comps.get(comp, []):
            parsed = _instr(line)
            if not parsed:
                continue
            name, result, opcode, operands, attrs = parsed
            if opcode in ("while", "call", "conditional", "async-start") and opcode != "fusion":
                for callee in re.findall(r"(?:calls|body|to_apply|branch_computations=\{)%?([\w.\-]+)", attrs):
                    if callee not in seen:
                        walk(callee, seen | {callee})
                continue
            if opcode in _FREE or opcode.endswith("-done"):
                continue
            callees = re.findall(r"calls=%?([\w.\-]+)", attrs)
            flops = (_conv_flops(result, operands, attrs) if opcode == "convolution"
                     else _dot_flops(result, operands, attrs) if opcode == "dot"
                     else sum(_computation_flops(comps, c) for c in callees))
            cost = re.search(r'"flops":"?(\d+)"?', attrs) if opcode == "custom-call" else None
            if cost:
                flops = float(cost.group(1))
            has_conv = opcode == "convolution" or any("convolution(" in "\n".join(comps.get(c, [])) for c in callees)
            out.append(Op(name, opcode, float(_shapes_bytes(result) + _shapes_bytes(operands)), flops,
                          _where(attrs), _kind(opcode, flops, attrs, has_conv)))

    walk("ENTRY", {"ENTRY"})
    return out


def seconds(op: Op, peak_flops: float, hbm_bytes_per_s: float) -> float:
    return max(op.flops / peak_flops, op.bytes / hbm_bytes_per_s)


def table(hlo: str, peak_flops: float, hbm_bytes_per_s: float, group: str = "kind") -> list[dict]:
    """Rows {group, ops, flops, bytes, seconds, bound} summed by ``kind`` or by model path prefix."""
    rows = defaultdict(lambda: dict(ops=0, flops=0.0, bytes=0.0, seconds=0.0, compute_s=0.0))
    for op in ops(hlo):
        key = op.kind if group == "kind" else _prefix(op.where, int(group.split(":")[1]) if ":" in group else 2)
        r = rows[key]
        r["ops"] += 1
        r["flops"] += op.flops
        r["bytes"] += op.bytes
        s = seconds(op, peak_flops, hbm_bytes_per_s)
        r["seconds"] += s
        r["compute_s"] += op.flops / peak_flops
    out = [dict(group=k, **v, compute_share=v["compute_s"] / v["seconds"] if v["seconds"] else 0.0)
           for k, v in rows.items()]
    return sorted(out, key=lambda r: -r["seconds"])


def _prefix(where: str, depth: int) -> str:
    parts = [p for p in where.split("/") if p and not p[0].isdigit()]
    mods = [p for p in parts if re.match(r"^[a-z_]+(_\d+)?$", p) and not p.startswith(("dot_general", "conv_general"))]
    return "/".join(mods[:depth]) or "(top)"


if __name__ == "__main__":
    import sys

    text = open(sys.argv[1]).read()
    print(json.dumps(table(text, 459e12, 2765e9), indent=1))
