"""Every documented command runs as written, up to the point where work would start: each command of the README's
bash blocks, of every module docstring in the repository, and the `# launch:` line of every experiment file
(conf/experiment/*.yaml) is parsed (make targets through the Makefile's own recipes, torchrun's world size from
--nnodes x --nproc_per_node, SLURM's from the launcher config, --multirun sweeps expanded), composed with Hydra and
checked as the stage checks itself before any work: the layout and batch for pretraining on that world size
(`train.pretrain.check_launch`), one process for the post-training stages. A command documented to fail (a comment
starting with `->`) must fail. Tools that are not Hydra stages (bench, model.info, ...) are not composed.
"""

from __future__ import annotations

import ast
import itertools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from eval.run import _ckpt_shorthand
from pipeline.config import CONF_DIR, to_config
from train.pretrain import check_launch
from train.runtime import require_one_process

REPO = Path(__file__).resolve().parents[2]
STAGES = {"data.prepare", "train.pretrain", "train.sft", "train.grpo", "distill.run", "eval.run", "pipeline"}
ONE_PROCESS = {"train.sft", "train.grpo", "distill.run", "pipeline"}
SOURCES = ["data", "model", "kernels", "rewards", "train", "distill", "eval", "pipeline", "bench"]


@dataclass
class Command:
    where: str  # file (and line) it is documented in
    text: str  # as written
    module: str
    overrides: list[str]
    world: int
    multirun: bool
    expect_failure: bool


def documented_lines() -> list[tuple[str, str, str]]:
    """(where, command, trailing comment) of every command line in the README, module docstrings, experiments."""
    found = []
    readme = (REPO / "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        found += [("README.md", *c) for c in _commands_in(block)]
    for folder in SOURCES:
        for path in sorted((REPO / folder).rglob("*.py")):
            doc = ast.get_docstring(ast.parse(path.read_text()))
            found += [(str(path.relative_to(REPO)), *c) for c in _commands_in(doc or "")]
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        launch = [line.split("launch:", 1)[1].strip() for line in path.read_text().splitlines() if "# launch:" in line]
        assert len(launch) == 1, f"{path.name}: every experiment file names its launch command (# launch: ...)"
        found.append((f"conf/experiment/{path.name}", launch[0], ""))
    return found


def _commands_in(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line, comment = _split_comment(line.strip())
        for command in line.split("&&"):
            if re.match(r"(python -m |torchrun |make )", command.strip()):
                out.append((command.strip(), comment.strip()))
    return out


def _split_comment(line: str) -> tuple[str, str]:
    m = re.match(r"(.*?)\s+#\s*(.*)$", line)
    return (m.group(1), m.group(2)) if m else (line, "")


def makefile() -> tuple[dict[str, list[str]], dict[str, str]]:
    """The Makefile's recipes (continuations joined) and variable defaults."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Makefile").read_text())
    recipes: dict[str, list[str]] = {}
    variables: dict[str, str] = {}
    target = None
    for line in text.splitlines():
        if m := re.match(r"^([A-Za-z_]+)\s*[?:]?=\s*(.*)$", line):
            variables[m.group(1)] = m.group(2).strip()
        elif m := re.match(r"^([a-zA-Z0-9_-]+):", line):
            target = m.group(1)
            recipes[target] = []
        elif line.startswith("\t") and target:
            recipes[target].append(line.strip())
    return recipes, variables


def parse(where: str, text: str, comment: str) -> list[Command]:
    """The stage commands a documented line runs (a make line may run several targets; others run none)."""
    text = re.sub(r"<[^>]*>", "x", text)  # placeholders: <run>, <node0>, <checkpoint> ...
    expect_failure = comment.startswith("->")
    tokens = shlex.split(text)
    if tokens[0] == "make":
        recipes, variables = makefile()
        assigned = dict(t.split("=", 1) for t in tokens[1:] if "=" in t)
        out = []
        for target in [t for t in tokens[1:] if "=" not in t]:
            for recipe in recipes[target]:
                if " -m " not in recipe or "$(if" in recipe:
                    continue
                expanded = re.sub(
                    r"\$\((\w+)\)", lambda m: assigned.get(m.group(1), variables.get(m.group(1), "")), recipe
                ).replace("$$", "$")
                words = shlex.split(expanded)
                while "=" in words[0]:  # environment assignments before the interpreter
                    words = words[1:]
                out += parse(f"{where} (make {target})", shlex.join(["python", *words[1:]]), comment)
        return out
    world, multirun = 1, False
    if tokens[0] == "torchrun" or tokens[:3] == ["python", "-m", "torch.distributed.run"]:
        args = tokens[1:] if tokens[0] == "torchrun" else tokens[3:]
        opts = dict(a.lstrip("-").split("=", 1) for a in args[: args.index("-m")] if "=" in a)
        world = int(opts.get("nnodes", 1)) * int(opts.get("nproc_per_node", 1))
        tokens = ["python", *args[args.index("-m") :]]
    assert tokens[:2] == ["python", "-m"], f"{where}: cannot parse {text!r}"
    module, args = tokens[2], tokens[3:]
    if module not in STAGES:
        return []
    multirun = "--multirun" in args or "-m" in args
    args = [a for a in args if a not in ("--multirun", "-m")]
    hydra = [a for a in args if a.startswith(("hydra/", "hydra."))]
    if "hydra/launcher=slurm" in hydra:  # each task of a SLURM job is one rank
        launcher = OmegaConf.load(CONF_DIR / "hydra" / "launcher" / "slurm.yaml")
        sizes = {k: int(launcher[k]) for k in ("nodes", "tasks_per_node")}
        sizes |= {a.split("=")[0].split(".")[-1]: int(a.split("=")[1]) for a in hydra if ".nodes=" in a}
        world = sizes["nodes"] * sizes["tasks_per_node"]
    overrides = [a for a in args if a not in hydra]
    if module == "eval.run":  # its CLI's own rewrite of `ckpt=X` before Hydra sees it
        overrides = _ckpt_shorthand(overrides)
    return [Command(where, text, module, overrides, world, multirun, expect_failure)]


def expand(cmd: Command) -> list[list[str]]:
    """The override lists a --multirun sweep composes (comma-separated values, every combination)."""
    if not cmd.multirun:
        return [cmd.overrides]
    choices = []
    for o in cmd.overrides:
        key, _, value = o.partition("=")
        values = value.split(",") if "," in value and not value.startswith(("[", "{")) else [value]
        choices.append([f"{key}={v}" for v in values])
    return [list(c) for c in itertools.product(*choices)]


@pytest.fixture(scope="module")
def hydra_conf():
    """One Hydra initialization for every composition (`pipeline.config.compose` initializes per call)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        yield


def check(cmd: Command, overrides: list[str]) -> None:
    """What the stage checks before any work, on the command's world size (as `pipeline.config.compose`)."""
    cfg = to_config(compose(config_name="config", overrides=overrides))
    if cmd.module in ONE_PROCESS:
        require_one_process(cmd.module, cmd.world)
    if cmd.module in ("train.pretrain", "pipeline"):
        check_launch(cfg, cmd.world)


COMMANDS = [c for where, text, comment in documented_lines() for c in parse(where, text, comment)]


def test_the_scan_finds_the_documented_commands():
    """Not vacuous: the README's and the stages' own commands, the distributed ones and every experiment are there."""
    modules = {c.module for c in COMMANDS}
    assert {"train.pretrain", "train.sft", "train.grpo", "distill.run", "pipeline"} <= modules, modules
    assert max(c.world for c in COMMANDS) >= 16 and any(c.multirun for c in COMMANDS)
    assert sum(c.where.startswith("conf/experiment/") for c in COMMANDS) == len(list(CONF_DIR.glob("experiment/*")))
    assert any(c.expect_failure for c in COMMANDS) and len(COMMANDS) >= 30, len(COMMANDS)
    assert ("pipeline/__main__.py", "python -m pipeline experiment=smoke") in {(c.where, c.text) for c in COMMANDS}


@pytest.mark.parametrize(
    "cmd",
    COMMANDS,
    ids=lambda c: f"{c.where}: {c.text}"[:150],
)
def test_documented_command_passes_validation(hydra_conf, cmd: Command):
    for overrides in expand(cmd):
        if cmd.expect_failure:
            with pytest.raises(Exception):  # noqa: B017  (the comment says what it prints; any refusal counts)
                check(cmd, overrides)
        else:
            check(cmd, overrides)
