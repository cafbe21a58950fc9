"""Per-op breakdown of a program compiled for TPU, from the compiler's own estimates.

XLA's TPU compiler writes an ``estimated_cycles`` figure into the backend config of every XLA
instruction it schedules (its scheduling cost model, not the roofline behind
``cost_analysis()["optimal_seconds"]``; Pallas kernels carry none). This reads them from the
compiled HLO text (``compiled.as_text()``) and sums them by kind of op, by pass, by model path
and by layer, so a change to the model can be judged op by op. Compiler-estimated, never measured.

    python -m benchmarks.aot_unet --impl sdjax --topology v5:2x2x1 --chip-config megacore --bounds 2,2,1 --hlo unet.hlo
    python -m benchmarks.hlo_ops unet.hlo
"""

import argparse
import dataclasses
import json
import re
from collections import defaultdict

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    opcode: str
    cycles: int
    kind: str  # matmul/conv, attention kernel, copy/transpose, collective, elementwise/reduce, other
    where: str  # the op's model path (Flax module names), transforms stripped
    backward: bool  # in the gradient computation (op_name under transpose(...))


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, body = {}, None
    for line in hlo.splitlines():
        if line and not line[0].isspace():
            head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s", line)
            body = comps.setdefault("ENTRY" if head and head.group(1) else head.group(2), []) if head else None
        elif body is not None and line.strip():
            body.append(line.strip())
    return comps


def _where(op_name: str) -> str:
    """``jit(loss)/transpose(jvp(UNet))/down_blocks_0/.../to_q/dot_general`` -> the module path and
    primitive, without the transforms (``jit(...)``, ``jvp(...)``, ``transpose(...)``)."""
    return "/".join(p for p in op_name.split("/") if p and "(" not in p and ")" not in p)


def _kind(opcode: str, line: str, comps: dict) -> str:
    if opcode == "custom-call":
        return "attention kernel" if "tpu_custom_call" in line else "other"
    if opcode.startswith(_COLLECTIVES):
        return "collective"
    if opcode in ("copy", "copy-start", "transpose"):
        return "copy/transpose"
    if opcode in ("convolution", "dot"):
        return "matmul/conv"
    if opcode == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = "\n".join(comps.get(called.group(1), [])) if called else ""
        if re.search(r"\s(convolution|dot)\(", body):
            return "matmul/conv"
        if re.search(r"\scopy\(|\stranspose\(", body) and not re.search(r"\s(add|multiply|exponential|reduce)\(", body):
            return "copy/transpose"
    return "elementwise/reduce"


def ops(hlo: str) -> list[Op]:
    """The instructions the TPU runs (entry computation, and the bodies of loops and calls it runs)."""
    comps = _computations(hlo)
    out: list[Op] = []

    def walk(comp: str, seen: frozenset):
        for line in comps.get(comp, []):
            m = re.match(r"^(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([\w\-]+)\(", line)
            if not m:
                continue
            name, opcode = m.groups()
            if opcode in ("while", "call", "conditional"):
                for callee in re.findall(r"(?:body|to_apply|calls|branch_computations=\{)=?%?([\w.\-]+)", line):
                    if callee not in seen:
                        walk(callee, seen | {callee})
            cycles = re.search(r'"estimated_cycles":"(\d+)"', line)
            if not cycles:
                continue
            op_name = re.search(r'op_name="([^"]*)"', line)
            op_name = op_name.group(1) if op_name else ""
            out.append(Op(name, opcode, int(cycles.group(1)), _kind(opcode, line, comps), _where(op_name),
                          "transpose(" in op_name))

    walk("ENTRY", frozenset({"ENTRY"}))
    return out


def table(hlo: str, group: str = "kind", depth: int = 3) -> list[dict]:
    """Rows {group, ops, cycles, share} summed by ``kind``, by model path (``where``, first
    ``depth`` module names), by ``pass`` (forward / backward) or by ``op`` (the same layer in every
    block, one primitive, one pass); ``share`` of all the program's estimated cycles."""
    all_ops = ops(hlo)
    total = sum(o.cycles for o in all_ops) or 1
    rows: dict[str, dict] = defaultdict(lambda: dict(ops=0, cycles=0))
    for o in all_ops:
        if group == "kind":
            key = o.kind
        elif group == "pass":
            key = "backward" if o.backward else "forward"
        elif group == "op":  # repeated layers together: blocks dropped, indices as _N, the primitive kept
            parts = o.where.split("/")
            layer = re.sub(r"_\d+", "_N", "/".join(parts[2:-1]))
            key = f"{'bwd' if o.backward else 'fwd'} {o.kind}: {layer}:{parts[-1] if parts else ''}"
        else:
            key = "/".join(o.where.split("/")[:depth]) or "(outside the model)"
        rows[key]["ops"] += 1
        rows[key]["cycles"] += o.cycles
    out = [dict(group=key, ops=r["ops"], cycles=r["cycles"], share=r["cycles"] / total) for key, r in rows.items()]
    return sorted(out, key=lambda r: -r["cycles"])


def format_table(rows: list[dict], title: str) -> str:
    lines = [f"| {title} | ops | estimated cycles | share |", "|---|---|---|---|"]
    lines += [f"| {r['group']} | {r['ops']} | {r['cycles'] / 1e6:.1f} M | {100 * r['share']:.1f}% |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("hlo", help="a compiled program's HLO text (e.g. benchmarks.aot_unet --hlo FILE)")
    p.add_argument("--depth", type=int, default=3, help="module names kept in the by-path table")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", help="also write the tables here")
    a = p.parse_args(argv)
    text = open(a.hlo).read()
    titles = {"kind": "kind of op", "pass": "pass", "where": "model path", "op": "op (every block's)"}
    tables = {g: table(text, g, a.depth) for g in titles}
    for g, rows in tables.items():
        print(format_table(rows[:a.top], titles[g]) + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(tables, f, indent=1)


if __name__ == "__main__":
    main()
