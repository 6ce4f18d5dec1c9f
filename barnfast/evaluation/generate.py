"""Quick look at an exported model: ``python -m barnfast.evaluation.generate --model DIR --image PATH --prompt "..."``.

    python -m barnfast.evaluation.generate --model out/llama3-tiny/export --image out/data/images/eval_open_00000.png \\
        --prompt "What colour are the shapes?"

Greedy decoding with the backbone's chat template and stop tokens (from ``barnfast.json``), the image
preprocessed as in training; ``--image`` may be left out for a text-only prompt. Prints the answer;
``--show-logprobs`` adds each chosen token's log-probability and the answer's confidence (geometric
mean of the token probabilities, as ``barnfast.evaluation.evaluate`` reports it for open answers).
"""

from __future__ import annotations

import argparse
import math
import sys

from barnfast.evaluation.exported import ExportedVLM


def generate(vlm: ExportedVLM, prompt: str, image=None, max_new_tokens: int = 64) -> dict:
    """``{"text", "token_ids", "logprobs", "confidence", "stopped"}`` of the greedy answer."""
    pv = vlm.pixel_values([image]) if image is not None else None
    ids, logps, stopped = vlm.greedy(vlm.prompt_ids(prompt, 1 if pv is not None else 0), pv, max_new_tokens)
    return {"text": vlm.decode(ids), "token_ids": ids, "logprobs": logps,
            "confidence": math.exp(sum(logps) / len(logps)) if logps else None, "stopped": stopped}


def empty_answer_hint(out: dict, vlm: ExportedVLM) -> str | None:
    """What to tell a user whose answer came back empty (None when it did not): the model ended its
    turn at once, or every token it produced was a special token that decoding drops."""
    if out["text"]:
        return None
    if out["stopped"] and not out["token_ids"]:
        first = math.exp(out["logprobs"][0]) if out["logprobs"] else float("nan")
        return (f"hint: the answer is empty: the model's first token was its end-of-turn token (p = {first:.2f}). "
                "An untrained or briefly trained model often does this; check the run's stage-2 loss in "
                "metrics.jsonl, and use --show-logprobs to see the token probabilities.")
    pieces = vlm.tokenizer.convert_ids_to_tokens(out["token_ids"][:8])
    return (f"hint: the answer is empty after decoding: its {len(out['token_ids'])} tokens are special tokens "
            f"that decoding skips ({' '.join(pieces)}{' ...' if len(out['token_ids']) > 8 else ''}); "
            "use --show-logprobs to see them.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m barnfast.evaluation.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported model folder (<run>/export)")
    p.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--show-logprobs", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    vlm = ExportedVLM(args.model, device=args.device)
    out = generate(vlm, args.prompt, args.image, args.max_new_tokens)
    print(out["text"])
    hint = empty_answer_hint(out, vlm)
    if hint:
        print(hint, file=sys.stderr)
    if args.show_logprobs:
        pieces = vlm.tokenizer.convert_ids_to_tokens(out["token_ids"])
        print("tokens:", " ".join(f"{t}({lp:.2f})" for t, lp in zip(pieces, out["logprobs"])))
        print(f"confidence: {out['confidence']:.4f}  stopped: {out['stopped']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
