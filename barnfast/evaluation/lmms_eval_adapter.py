"""lmms-eval model class for barnfast exports: ``--model barnfast --model_args pretrained=<run>/export``.

    pip install lmms-eval
    python -c "import barnfast.evaluation.lmms_eval_adapter" && \\
    python -m lmms_eval --model barnfast --model_args pretrained=out/llama3/export --tasks pope,scienceqa_img

Importing this module registers :class:`BarnfastLMM` under the name ``barnfast`` with lmms-eval's
``register_model`` when lmms-eval is importable (without it the class still works, over any objects
shaped like lmms-eval's ``Instance``: an ``args`` tuple). For lmms-eval >= 0.6, which finds plugin
models through the ``lmms_eval.models`` entry-point group, :func:`lmms_eval_manifest` is the entry
point's target (``barnfast = "barnfast.evaluation.lmms_eval_adapter:lmms_eval_manifest"`` in the package's
``[project.entry-points."lmms_eval.models"]``).

The requests, as lmms-eval's "simple" models receive them:

- ``loglikelihood``: ``args = (context, doc_to_target, doc_to_visual, doc_id, task, split)``;
  returns ``(sum of the continuation's token log-probabilities, whether every continuation token is
  the arg-max)`` per request. The continuation's tokens are those training would label for that
  answer, without the end-of-turn token (lmms-eval scores the continuation text only).
- ``generate_until``: ``args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)``; greedy
  decoding up to ``max_new_tokens`` (default 128) or a stop token, the text cut at the first of
  ``gen_kwargs["until"]``. Sampling settings (``temperature > 0``) are not supported and raise.

``doc_to_visual(self.task_dict[task][split][doc_id])`` gives the images (PIL); the context gets one
``<image>`` placeholder per image in front unless it has its own, as lmms-eval's LLaVA model does.
"""

from __future__ import annotations

import numpy as np

from barnfast.evaluation.exported import ExportedVLM

try:  # lmms-eval is optional; see the module docstring
    from lmms_eval.api.model import lmms as _LMMSBase
    from lmms_eval.api.registry import register_model as _register_model

    HAS_LMMS_EVAL = True
    LMMS_EVAL_MISSING = ""
except ImportError as exc:  # noqa: F841 - recorded for the message below
    _LMMSBase = object
    HAS_LMMS_EVAL = False
    LMMS_EVAL_MISSING = f"lmms-eval is not importable ({exc}); BarnfastLMM is not registered"

    def _register_model(*names):
        return lambda cls: cls


@_register_model("barnfast")
class BarnfastLMM(_LMMSBase):
    """An exported barnfast model behind lmms-eval's ``lmms`` interface."""

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str = 1,
                 max_new_tokens: int = 128, **kwargs):
        super().__init__()
        if int(batch_size) != 1:
            raise ValueError("BarnfastLMM scores one request at a time (batch_size=1)")
        self.vlm = ExportedVLM(pretrained, device=device)
        self.max_new_tokens = int(max_new_tokens)
        self.task_dict = getattr(self, "task_dict", {})
        self._rank, self._world_size = getattr(self, "_rank", 0), getattr(self, "_world_size", 1)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        return [v for v in (visuals or []) if v is not None]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            target = doc_to_target if isinstance(doc_to_target, str) else \
                doc_to_target(self.task_dict[task][split][doc_id])
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            n = len(visuals) if "<image>" not in context else context.count("<image>")
            prompt = self.vlm.prompt_ids(context, n)
            cont = self.vlm.answer_ids(context, target.strip(), n, include_stop=False)
            pv = self.vlm.pixel_values(visuals)
            lp, is_greedy = self.vlm.continuation_logprobs(prompt, [cont], pv, with_greedy=True)[0]
            out.append((float(np.sum(lp)), is_greedy))
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            if float(gen_kwargs.get("temperature", 0) or 0) > 0 and gen_kwargs.get("do_sample", False):
                raise NotImplementedError("BarnfastLMM decodes greedily; sampling is not supported")
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            n = len(visuals) if "<image>" not in context else context.count("<image>")
            ids, _, _ = self.vlm.greedy(self.vlm.prompt_ids(context, n), self.vlm.pixel_values(visuals),
                                        int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)))
            text = self.vlm.decode(ids)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop, 1)[0]
            out.append(text)
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("multi-round generation is not supported by BarnfastLMM")


def lmms_eval_manifest():
    """The ``lmms_eval.models`` entry point's payload (lmms-eval >= 0.6)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="barnfast", simple_class_path="barnfast.evaluation.lmms_eval_adapter.BarnfastLMM")
