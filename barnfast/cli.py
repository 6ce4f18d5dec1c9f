"""The ``barnfast`` command: one entry point, one subcommand per stage of the work.

    barnfast train    --backbone llama1-tiny --output-dir out/llama1-tiny   # = python -m barnfast.train
    barnfast sweep    --backbones llama1-tiny,llama3-tiny --output-dir out  # = python -m barnfast.sweep
    barnfast eval     --model out/llama1-tiny/export --data FILE            # = python -m barnfast.evaluation.evaluate
    barnfast analyze  out                                                   # = python -m barnfast.evaluation.analyze
    barnfast generate --model DIR --image PATH --prompt "..."               # = python -m barnfast.evaluation.generate
    barnfast data     --out data                                            # = python -m barnfast.data.synthetic

Each subcommand is the ``main`` of its module, imported only when it runs, so ``barnfast --help``
stays fast. ``python -m barnfast SUBCOMMAND ...`` is the same command without the console script.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module whose main() runs it, one line of help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("barnfast.train", "train one backbone through the recipe's stages and export it"),
    "sweep": ("barnfast.sweep", "train and evaluate several backbones under one controlled recipe"),
    "eval": ("barnfast.evaluation.evaluate", "evaluate an exported model on a benchmark file"),
    "analyze": ("barnfast.evaluation.analyze", "write a sweep's report: accuracy, overlap, calibration, stability"),
    "generate": ("barnfast.evaluation.generate", "print one greedy answer for an image and a prompt"),
    "data": ("barnfast.data.synthetic", "write the built-in synthetic LLaVA-format dataset"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: barnfast SUBCOMMAND [ARGS ...]", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "barnfast SUBCOMMAND --help shows a subcommand's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"barnfast: unknown subcommand {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    result = module.main(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
