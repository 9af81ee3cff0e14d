"""How the code is laid out: imports against the data flow, in-function imports, function and loop lengths.

    python -m bench.code_structure                 # this checkout -> bench/results/code_structure.csv
    python -m bench.code_structure --rev 2037db0   # a past commit (read with `git show`, nothing checked out)
    python -m bench.code_structure --list          # also print every arrow and in-function import

The layering it checks is DESIGN.md's: data flows `data -> train -> distill -> eval`; libraries (kernels, model,
rewards, the stage contract in pipeline/) sit below every stage, and the orchestrator (`python -m pipeline`) above.
Config modules (`<pkg>/config.py`, `train/post_config.py`, `train/parallel/config.py`) hold dataclasses only, and
`pipeline/config.py` is the schema composed of them: they are leaves, not stage logic, so importing them is no
arrow. An arrow against the flow is one of
  - a library module importing a stage package (e.g. model/ importing train/),
  - a stage package importing a later one (train/ importing eval/),
  - a stage module importing another stage module (the entry points `data.prepare`, `train.pretrain`,
    `train.sft`, `train.grpo`, `distill.run`, `eval.run`, `eval.report` are for the orchestrator only).
Imports under `if TYPE_CHECKING:` are not counted (no run-time edge).
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import append_result

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "model", "rewards", "pipeline", "data", "train", "distill", "eval")
STAGE_ORDER = {"data": 0, "train": 1, "distill": 2, "eval": 3}
ORCHESTRATOR = ("pipeline.__main__",)
STAGE_MODULES = ("data.prepare", "train.pretrain", "train.sft", "train.grpo", "distill.run", "eval.run", "eval.report")
# the stages' training loops, for the lines-per-loop figure: (module, function)
LOOPS = (
    ("train.pretrain", "train"),
    ("train.sft", "train"),
    ("train.grpo", "train"),
    ("distill.student", "train_student"),
)


def is_config(module: str) -> bool:
    return module.endswith(".config") or module == "train.post_config"


def is_library(module: str) -> bool:
    """kernels/, model/, rewards/ and the stage contract: every module of pipeline/ but the orchestrator."""
    top = module.split(".")[0]
    return top in ("kernels", "model", "rewards") or (top == "pipeline" and module not in ORCHESTRATOR)


def arrow_against_flow(src: str, dst: str) -> str | None:
    """Why the import src -> dst runs against the flow, or None when it does not."""
    if is_config(dst) or is_config(src) or dst == src:
        return None
    if dst in STAGE_MODULES and src != dst and src not in ORCHESTRATOR and not src.startswith("bench"):
        return "imports a stage module"
    if is_library(src) and not is_library(dst) and dst.split(".")[0] in PACKAGES:
        return "a library imports a stage"
    s, d = src.split(".")[0], dst.split(".")[0]
    if s in STAGE_ORDER and d in STAGE_ORDER and STAGE_ORDER[d] > STAGE_ORDER[s]:
        return "a stage imports a later stage"
    if dst in ORCHESTRATOR and src not in ORCHESTRATOR:
        return "imports the orchestrator"
    return None


@dataclass
class Report:
    arrows: list[tuple[str, str, str]] = field(default_factory=list)
    inner_imports: list[tuple[str, int, str]] = field(default_factory=list)
    functions: list[tuple[str, str, int]] = field(default_factory=list)  # (module, qualified name, lines)
    loops: dict[str, int] = field(default_factory=dict)


def _imported(node: ast.AST, module: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative import: resolve against the importing package
            base = module.split(".")[: -node.level]
            return [".".join([*base, node.module] if node.module else base)]
        return [node.module or ""]
    return []


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return ids


def analyse_module(module: str, source: str, report: Report) -> None:
    tree = ast.parse(source)
    skip = _type_checking_nodes(tree)
    own = {p for p in PACKAGES}

    def visit(node: ast.AST, scope: list[str], in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom) and id(child) not in skip:
                for dst in _imported(child, module):
                    if in_function:
                        report.inner_imports.append((module, child.lineno, dst))
                    if dst.split(".")[0] in own:
                        why = arrow_against_flow(module, dst)
                        if why:
                            report.arrows.append((module, dst, why))
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = ".".join([*scope, child.name])
                report.functions.append((module, name, child.end_lineno - child.lineno + 1))
                if (module, name) in LOOPS:
                    report.loops[f"{module}.{name}"] = child.end_lineno - child.lineno + 1
                visit(child, [*scope, child.name], True)
            elif isinstance(child, ast.ClassDef):
                visit(child, [*scope, child.name], in_function)
            else:
                visit(child, scope, in_function)

    visit(tree, [], False)


def _read(rev: str | None, path: str) -> str:
    if rev is None:
        return (REPO / path).read_text()
    show = ["git", "show", f"{rev}:{path}"]
    return subprocess.run(show, cwd=REPO, capture_output=True, text=True, check=True).stdout


def sources(rev: str | None) -> dict[str, str]:
    """module name -> source text, for the packages, from the working tree or a git revision."""
    if rev is None:
        files = [p.relative_to(REPO).as_posix() for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")]
    else:
        ls = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev], cwd=REPO, capture_output=True, text=True)
        files = [f for f in ls.stdout.split() if f.endswith(".py") and f.split("/")[0] in PACKAGES]
    return {f.removesuffix(".py").replace("/", ".").removesuffix(".__init__"): _read(rev, f) for f in files}


def analyse(rev: str | None = None) -> Report:
    report = Report()
    for module, text in sorted(sources(rev).items()):
        analyse_module(module, text, report)
    return report


def summary(report: Report) -> dict:
    longest = max(report.functions, key=lambda f: f[2])
    return {
        "arrows_against_flow": len(report.arrows),
        "in_function_imports": len(report.inner_imports),
        "longest_function": f"{longest[0]}.{longest[1]}",
        "longest_function_lines": longest[2],
        "functions_over_60_lines": sum(1 for f in report.functions if f[2] > 60),
        **{f"loop_lines/{k}": v for k, v in report.loops.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default=None, help="a git revision instead of the working tree")
    ap.add_argument("--list", action="store_true", help="print every arrow and in-function import")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    report = analyse(args.rev)
    row = {"rev": args.rev or "worktree", **summary(report)}
    if args.list:
        for src, dst, why in report.arrows:
            print(f"arrow   {src} -> {dst}: {why}")
        for mod, line, dst in report.inner_imports:
            print(f"inner   {mod}:{line} imports {dst}")
    for k, v in row.items():
        print(f"{k:<40} {v}")
    if not args.no_csv:
        append_result("code_structure", row)
    return row


if __name__ == "__main__":
    main()
