"""``make mutate``: mutation testing of gateway/ with the fast unit suite.

    python -m tests.mutation.run [--report-only] [MODULE ...]

MODULE is a file or folder under gateway/ (``gateway/calls.py``, ``gateway/store``); none means all
of gateway/.  The checkout is copied to var/mutate/tree (so the working tree is never touched and
others can keep running tests in it) and mutmut runs there: the mutants of each function are tried
against the unit tests that call that function, each in a forked process of its own, with the
pytest plugin tests/mutation/plugin.py (fixed Hypothesis seed, no process-starting tests) and without
tests/integration (see setup.cfg, [mutmut]).

Then, per module, it prints every surviving mutant that the allow-list (tests/mutation/allowed.txt)
does not excuse as equivalent, and writes var/mutate/score.json:
score = killed / (mutants - allowed equivalents).  A run over some modules updates their entries and
keeps the others'.  ``--report-only`` reports again from the last run without running anything.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "var" / "mutate"
TREE = WORK / "tree"
ALLOWED = Path(__file__).resolve().parent / "allowed.txt"
SCORE = WORK / "score.json"
SURVIVORS = WORK / "survivors.txt"
# Modules held to the target of issue 14 (90 % of non-equivalent mutants killed).
TARGETED = (
    "gateway/calls.py",
    "gateway/engine.py",
    "gateway/outbox.py",
    "gateway/store/",
    "gateway/web/public.py",
    "gateway/protocols/",
    "gateway/crm/",
)
TARGET = 0.90
# Not copied into the tree: version control, environments, outputs.
SKIP_TOP = {".git", ".venv", "var", "build", "mutants", ".hypothesis", "_trial_temp", ".pytest_cache"}
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
# Not (yet) tried: a run still going or interrupted.  Left out of the score, and said so.
UNTRIED = {"not checked", "check was interrupted by user"}
ARROW, REASON = " ~> ", " ~~ "


@dataclass
class Survivor:
    name: str  # mutmut's key: gateway.calls.xǁPolicyǁis_extension__mutmut_3
    module: str  # gateway/calls.py
    function: str  # Policy.is_extension
    status: str  # survived, no tests, suspicious
    old: str  # the source text the mutation replaced, whitespace collapsed
    new: str
    diff: str

    @property
    def key(self) -> str:
        return f"{self.module}::{self.function}: {self.old}{ARROW}{self.new}"


@dataclass
class Tally:
    total: int = 0
    untried: int = 0
    skipped: int = 0  # in statements setup.cfg's do_not_mutate_patterns leaves out
    killed: int = 0
    allowed: int = 0
    survivors: list[Survivor] = field(default_factory=list)
    matched: set[str] = field(default_factory=set)  # allow-list keys this module's mutants matched

    @property
    def score(self) -> float | None:
        mutants = self.total - self.allowed
        return self.killed / mutants if mutants else None


def squash(text: str) -> str:
    return " ".join(text.split())


SQL_WORDS = re.compile(r"\b(select|insert|update|delete|where|from|order by|group by|values|set|limit|"
                       r"and|or|in|desc|count|coalesce|max|on conflict|returning)\b|= \?", re.I)
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def sql_case(old: str, new: str) -> bool:
    """The mutation only changed the letter case of SQL, not of a quoted SQL literal in it."""
    if old == new or old.lower() != new.lower():
        return False
    olds, news = STRING.findall(old), STRING.findall(new)
    if len(olds) != len(news) or STRING.sub('""', old) != STRING.sub('""', new):
        return False
    changed = [(o, n) for o, n in zip(olds, news) if o != n]
    quoted = re.compile(r"'[^']*'")  # SQL string literals: their case matters
    return bool(changed) and all(SQL_WORDS.search(o) and quoted.findall(o) == quoted.findall(n)
                                 for o, n in changed)


# Named classes of equivalent mutants, enabled by a ``rule NAME ~~ reason`` line.
RULES = {"sql-case": lambda survivor: sql_case(survivor.old, survivor.new)}


def load_rules(path: Path = ALLOWED) -> dict[str, str]:
    rules = {}
    if path.exists():
        for line in path.read_text("utf-8").splitlines():
            if line.startswith("rule "):
                name, _, reason = line[len("rule "):].partition(REASON)
                if name.strip() not in RULES or not reason.strip():
                    raise SystemExit(f"{path}: unknown rule or no reason: {line!r}")
                rules[name.strip()] = reason.strip()
    return rules


def load_allowed(path: Path = ALLOWED) -> dict[str, str]:
    """The allow-list: ``module::Function.name: old ~> new ~~ reason``, one mutant a line."""
    allowed: dict[str, str] = {}
    if not path.exists():
        return allowed
    for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#") or line.startswith("rule "):
            continue
        if REASON not in line or ARROW not in line or "::" not in line:
            raise SystemExit(f"{path}:{number}: want 'module::function: old ~> new ~~ reason', got {line!r}")
        key, reason = line.rsplit(REASON, 1)
        head, _, rest = key.partition(": ")
        old, _, new = rest.partition(ARROW)
        if not reason.strip():
            raise SystemExit(f"{path}:{number}: an allowed mutant needs the reason it changes no behaviour")
        allowed[f"{head.strip()}: {squash(old)}{ARROW}{squash(new)}"] = reason.strip()
    return allowed


def function_of(name: str) -> str:
    """``gateway.calls.xǁPolicyǁis_extension__mutmut_3`` -> ``Policy.is_extension``."""
    last = name.rsplit(".", 1)[-1].rsplit("__mutmut_", 1)[0]
    if last.startswith("xǁ"):
        return ".".join(last[2:].split("ǁ"))
    return last[2:] if last.startswith("x_") else last


def mutation_text(diff: str) -> tuple[str, str]:
    lines = diff.splitlines()
    body = [line for line in lines if not line.startswith(("---", "+++", "@@"))]
    old = squash(" ".join(line[1:] for line in body if line.startswith("-")))
    new = squash(" ".join(line[1:] for line in body if line.startswith("+")))
    return old, new


def refresh_tests() -> list[str]:
    """For --survivors: the checkout's tests into the last run's tree, and the mutants to try
    again (every one tried and not killed).  The code under test must be the one that run
    mutated."""
    changed = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "gateway").rglob("*.py"))
               if not (TREE / p.relative_to(ROOT)).exists()
               or (TREE / p.relative_to(ROOT)).read_bytes() != p.read_bytes()]
    if changed:
        raise SystemExit(f"gateway/ changed since the last run ({', '.join(changed[:5])}): "
                         "run the modules again without --survivors")
    for where in (TREE / "tests", TREE / "mutants" / "tests"):
        shutil.rmtree(where, ignore_errors=True)
        shutil.copytree(ROOT / "tests", where, ignore=shutil.ignore_patterns("__pycache__"))
    from mutmut.stats import status_by_exit_code

    names = []
    for meta in sorted((TREE / "mutants" / "gateway").rglob("*.py.meta")):
        verdicts = json.loads(meta.read_text("utf-8")).get("exit_code_by_key", {})
        names += [n for n, code in verdicts.items()
                  if status_by_exit_code[code] not in KILLED | UNTRIED]
    return names


def copy_tree() -> None:
    if TREE.exists():
        shutil.rmtree(TREE)
    TREE.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", "_trial_temp", "results")
    for entry in sorted(ROOT.iterdir()):
        if entry.name in SKIP_TOP or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, TREE / entry.name, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(entry, TREE / entry.name)


def patterns_for(modules: list[str]) -> list[str]:
    patterns = []
    for module in modules:
        path = Path(module)
        if path.is_absolute():
            path = path.relative_to(ROOT)
        text = path.as_posix().rstrip("/")
        if not text.startswith("gateway"):
            raise SystemExit(f"{module}: only modules under gateway/ are mutated")
        if not (ROOT / text).exists():
            raise SystemExit(f"{module}: no such file or folder")
        patterns.append(text if text.endswith(".py") else f"{text}/*")
    return patterns


def configure(patterns: list[str]) -> None:
    """The tree's setup.cfg: the checked-in [mutmut] section, restricted to the named modules."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(TREE / "setup.cfg", encoding="utf-8")
    if patterns:
        config["mutmut"]["only_mutate"] = "\n" + "\n".join(patterns)
    with open(TREE / "setup.cfg", "w", encoding="utf-8") as handle:
        config.write(handle)


def run_mutmut(children: int, names: list[str] = ()) -> int:
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *names]
    log = WORK / "mutmut.log"
    print(f"mutmut running in {TREE} (log: {log})", flush=True)
    started = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        process = subprocess.Popen(command, cwd=TREE, env=env, stdout=out, stderr=subprocess.STDOUT)
        while process.poll() is None:
            time.sleep(30)
            print(f"  ... {progress(log)} ({time.monotonic() - started:.0f} s)", flush=True)
    print(f"mutmut done in {time.monotonic() - started:.0f} s, exit {process.returncode}")
    if process.returncode:
        print(log.read_text("utf-8", "replace")[-4000:])
    return process.returncode


def progress(log: Path) -> str:
    text = log.read_text("utf-8", "replace")
    marks = re.findall(r"(\d+/\d+)\s+🎉 (\d+)", text)
    if marks:
        done, killed = marks[-1]
        return f"{done} mutants tried, {killed} killed"
    spinners = re.findall(r"⠿?[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] ([A-Z][a-z ]+)", text)
    return spinners[-1].strip() if spinners else "starting"


class Skipped:
    """Survivors inside a statement that ``do_not_mutate_patterns`` (setup.cfg) leaves out.

    mutmut does not generate those mutants; this drops any that an older tree still has, so
    runs before and after a pattern change give comparable scores.
    """

    def __init__(self) -> None:
        config = configparser.ConfigParser(interpolation=None)
        config.read(ROOT / "setup.cfg", encoding="utf-8")
        raw = config.get("mutmut", "do_not_mutate_patterns", fallback="")
        self.patterns = [re.compile(p) for p in raw.splitlines() if p.strip()]
        self.lines: dict[str, set[int]] = {}

    def _ignored(self, source: str) -> set[int]:
        if source not in self.lines:
            import ast

            text = (TREE / source).read_text("utf-8")
            hits = {n for n, line in enumerate(text.splitlines(), 1)
                    if any(p.search(line) for p in self.patterns)}
            ignored: set[int] = set()
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.stmt) and not hasattr(node, "body"):
                    span = set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
                    if span & hits:
                        ignored |= span
            self.lines[source] = ignored
        return self.lines[source]

    def __call__(self, survivor: "Survivor") -> bool:
        if not self.patterns:
            return False
        removed = [line[1:].strip() for line in survivor.diff.splitlines()
                   if line.startswith("-") and not line.startswith("---")]
        if not removed:
            return False
        text = (TREE / survivor.module).read_text("utf-8").splitlines()
        ignored = self._ignored(survivor.module)
        return any(line.strip() == removed[0] for n, line in enumerate(text, 1) if n in ignored)


def collect() -> dict[str, Tally]:
    """Read mutmut's verdicts from the tree, with the diff of every mutant that was not killed."""
    os.chdir(TREE)
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    allowed = load_allowed()
    rules = [RULES[name] for name in load_rules()]
    skip = Skipped()
    tallies: dict[str, Tally] = defaultdict(Tally)
    for meta in sorted((TREE / "mutants" / "gateway").rglob("*.py.meta")):
        source = meta.relative_to(TREE / "mutants").as_posix()[: -len(".meta")]
        verdicts = json.loads(meta.read_text("utf-8")).get("exit_code_by_key", {})
        tally = tallies[source]
        for name, code in sorted(verdicts.items()):
            status = status_by_exit_code[code]
            if status in UNTRIED:
                tally.untried += 1
                continue
            diff = get_diff_for_mutant(name, path=source)
            old, new = mutation_text(diff)
            survivor = Survivor(name, source, function_of(name), status, old, new, diff)
            if skip(survivor):
                tally.skipped += 1
                continue
            tally.total += 1
            if status in KILLED:
                tally.killed += 1
            elif survivor.key in allowed:
                tally.allowed += 1
                tally.matched.add(survivor.key)
            elif any(rule(survivor) for rule in rules):
                tally.allowed += 1
            else:
                tally.survivors.append(survivor)
    os.chdir(ROOT)
    return dict(tallies)


def group_of(module: str) -> str | None:
    for target in TARGETED:
        if module == target or (target.endswith("/") and module.startswith(target)):
            return target
    return None


def report(tallies: dict[str, Tally]) -> None:
    with open(SURVIVORS, "w", encoding="utf-8") as out:
        for module, tally in tallies.items():
            for survivor in tally.survivors:
                print(f"\n{survivor.name} ({survivor.status})\n{survivor.diff}", file=out)
                print(f"  allow-list key: {survivor.key}{REASON}<why it changes nothing>", file=out)

    for module, tally in tallies.items():
        if not tally.survivors:
            continue
        print(f"\n=== {module}: {len(tally.survivors)} surviving mutants")
        for survivor in tally.survivors:
            tag = "" if survivor.status == "survived" else f"  [{survivor.status}]"
            print(f"  {survivor.function}: {survivor.old}{ARROW}{survivor.new}{tag}")

    scores = json.loads(SCORE.read_text("utf-8")) if SCORE.exists() else {}
    modules = scores.setdefault("modules", {})
    for module, tally in tallies.items():
        modules[module] = {
            "mutants": tally.total,
            "killed": tally.killed,
            "equivalent": tally.allowed,
            "survived": len(tally.survivors),
            "score": None if tally.score is None else round(tally.score, 4),
            "untried": tally.untried,
            "not_mutated": tally.skipped,
        }
    groups = {}
    for target in TARGETED:
        members = [entry for name, entry in modules.items() if group_of(name) == target]
        if not members:
            continue
        mutants = sum(m["mutants"] - m["equivalent"] for m in members)
        killed = sum(m["killed"] for m in members)
        groups[target] = {"mutants": mutants, "killed": killed, "score": round(killed / mutants, 4) if mutants else None}
    scores["targets"] = groups
    scores["target"] = TARGET
    scores["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    SCORE.write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n", "utf-8")

    print(f"\n{'module':34} {'mutants':>7} {'killed':>7} {'equiv':>6} {'survived':>8} {'score':>7}")
    for module in sorted(modules):
        m = modules[module]
        score = "-" if m["score"] is None else f"{100 * m['score']:.1f}%"
        mark = "" if module in tallies else "  (earlier run)"
        if m.get("untried"):
            mark += f"  ({m['untried']} mutants not tried yet)"
        print(f"{module:34} {m['mutants']:7} {m['killed']:7} {m['equivalent']:6} {m['survived']:8} {score:>7}{mark}")
    print(f"\ntargets (>= {100 * TARGET:.0f}% of non-equivalent mutants killed):")
    for target, g in groups.items():
        ok = g["score"] is not None and g["score"] >= TARGET
        print(f"  {target:32} {g['killed']:5}/{g['mutants']:<5} {100 * (g['score'] or 0):5.1f}%  {'ok' if ok else 'BELOW'}")
    print(f"\nscores: {SCORE}; survivors with diffs and allow-list keys: {SURVIVORS}")


def use_work(work: Path) -> None:
    global WORK, TREE, SCORE, SURVIVORS
    WORK = work.resolve()
    TREE, SCORE, SURVIVORS = WORK / "tree", WORK / "score.json", WORK / "survivors.txt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="files or folders under gateway/ (default: all of gateway/)")
    parser.add_argument("--report-only", action="store_true", help="report the last run again, run nothing")
    parser.add_argument("--survivors", action="store_true",
                        help="try the last run's surviving mutants again with the checkout's tests "
                             "(after writing tests; gateway/ must be unchanged)")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2, help="mutants tried at once")
    parser.add_argument("--work", type=Path, default=WORK, help="where the tree and the scores go (var/mutate)")
    args = parser.parse_args(argv)
    use_work(args.work)

    WORK.mkdir(parents=True, exist_ok=True)
    if args.survivors:
        if not (TREE / "mutants").exists():
            raise SystemExit("no earlier run under var/mutate: run without --survivors first")
        names = refresh_tests()
        print(f"trying {len(names)} surviving mutants again")
        if names and run_mutmut(args.children, names):
            return 1
    elif not args.report_only:
        copy_tree()
        configure(patterns_for(args.modules))
        if run_mutmut(args.children):
            return 1
    elif not (TREE / "mutants").exists():
        raise SystemExit("no earlier run under var/mutate: run without --report-only first")
    tallies = collect()
    if not tallies:
        print("no mutants: nothing under gateway/ matched")
        return 1
    report(tallies)
    matched = {key for tally in tallies.values() for key in tally.matched}
    stale = [key for key in load_allowed() if key.split("::", 1)[0] in tallies and key not in matched]
    if stale:
        print("\nallow-list lines that match no mutant any more (the code changed; review and remove):")
        for key in stale:
            print(f"  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
