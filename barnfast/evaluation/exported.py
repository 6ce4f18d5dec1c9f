"""An exported barnfast model, loaded for scoring: prompts, option log-likelihoods, greedy answers,
hidden states.

The folder is what ``barnfast.train`` writes under ``export/`` (a Hugging Face
``LlavaForConditionalGeneration`` folder plus ``barnfast.json``). Prompts are built with the chat
template the model was trained with (``barnfast.json``'s ``chat_template``), images are
preprocessed the way it was trained (``image_aspect``: LLaVA-1.5's pad-to-square by default), and
an answer's tokens are exactly the labelled tokens training would have used for it
(``encode_conversation`` minus ``encode_prompt``), so a score never depends on a re-tokenisation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch

from barnfast.data.chat import IMAGE_PLACEHOLDER, encode_conversation, encode_prompt
from barnfast.data.images import load_image
from barnfast.models import vision as vision_registry
from barnfast.models.export import read_meta


class ExportedVLM:
    """``LlavaForConditionalGeneration`` + tokenizer + the barnfast metadata of one export folder."""

    def __init__(self, folder: str | Path, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoTokenizer, LlavaForConditionalGeneration

        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        missing = [k for k in ("chat_template", "vision", "num_image_tokens", "image_token_id", "stop_tokens")
                   if k not in self.meta]
        if missing:
            raise ValueError(f"{self.folder} has no barnfast.json with {missing}; is it a barnfast export folder?")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = LlavaForConditionalGeneration.from_pretrained(self.folder, dtype=dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.vision = vision_registry.from_name(self.meta["vision"])
        self.template = self.meta["chat_template"]
        self.system = self.meta.get("system_prompt")  # None (or an older export): the template's own
        self.image_token_id = int(self.meta["image_token_id"])
        self.num_image_tokens = int(self.meta["num_image_tokens"])
        self.image_aspect = self.meta.get("image_aspect", "pad")
        self.stop_ids = {int(self.tokenizer.convert_tokens_to_ids(t)) for t in self.meta["stop_tokens"]}
        self.num_layers = self.model.config.text_config.num_hidden_layers

    # -- inputs -----------------------------------------------------------------------------------
    def pixel_values(self, images) -> torch.Tensor | None:
        """``(n, 3, S, S)`` float pixels of PIL images or paths (None for no image)."""
        if not images:
            return None
        imgs = [load_image(i) if isinstance(i, (str, Path)) else i for i in images]
        for im in imgs:
            if not isinstance(im, PIL.Image.Image):
                raise TypeError(f"expected a PIL image or a path, got {type(im).__name__}")
        return torch.stack([self.vision.preprocess(im, mode=self.image_aspect) for im in imgs])

    def _conversation(self, prompt: str, num_images: int) -> list[dict]:
        # LLaVA's convention: the image placeholder(s) first, then a newline and the question.
        if num_images and IMAGE_PLACEHOLDER not in prompt:
            prompt = (IMAGE_PLACEHOLDER + "\n") * num_images + prompt
        return [{"from": "human", "value": prompt}]

    def prompt_ids(self, prompt: str, num_images: int = 1) -> list[int]:
        """Ids of the prompt with the assistant prefix; each image is ``num_image_tokens`` slots."""
        return encode_prompt(self.tokenizer, self.template, self._conversation(prompt, num_images),
                             image_token_id=self.image_token_id, num_image_tokens=self.num_image_tokens,
                             system=self.system)

    def answer_ids(self, prompt: str, answer: str, num_images: int = 1, include_stop: bool = True) -> list[int]:
        """The tokens training labels for ``answer`` after ``prompt`` (with the end-of-turn token
        unless ``include_stop=False``)."""
        conv = self._conversation(prompt, num_images) + [{"from": "gpt", "value": answer}]
        ids, _ = encode_conversation(self.tokenizer, self.template, conv, image_token_id=self.image_token_id,
                                     num_image_tokens=self.num_image_tokens, system=self.system)
        prefix = self.prompt_ids(prompt, num_images)
        if ids[:len(prefix)] != prefix:
            raise RuntimeError(f"template {self.template!r}: the prompt ids are not a prefix of the conversation")
        cont = ids[len(prefix):]
        if not include_stop:
            while cont and cont[-1] in self.stop_ids:
                cont = cont[:-1]
        if not cont:
            raise ValueError(f"answer {answer!r} has no tokens")
        return cont

    # -- scores -----------------------------------------------------------------------------------
    @torch.no_grad()
    def continuation_logprobs(self, prompt_ids: list[int], continuations: list[list[int]],
                              pixel_values: torch.Tensor | None, with_greedy: bool = False) -> list:
        """Per-token log-probabilities of each continuation after the prompt (one batched forward,
        right-padded). Returns one ``(len(cont),)`` float64 array per continuation; with
        ``with_greedy``, ``(array, every token is the arg-max)`` pairs."""
        k, p = len(continuations), len(prompt_ids)
        seqs = [prompt_ids + c for c in continuations]
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((k, width), pad, dtype=torch.long)
        mask = torch.zeros((k, width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        pv = None
        if pixel_values is not None:
            pv = pixel_values.repeat(k, 1, 1, 1).to(self.device, self.model.dtype)
        # Every continuation starts at position p: only the last width - p + 1 positions' logits are
        # needed (a 7B model with 576 image slots and a 128k vocabulary would otherwise hold k·W·V floats).
        keep = width - p + 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            pixel_values=pv, logits_to_keep=keep).logits  # (k, keep, V)
        out = []
        for i, c in enumerate(continuations):
            logp = torch.log_softmax(logits[i, :len(c)].float(), dim=-1)  # (len(c), V)
            tgt = torch.tensor(c, device=self.device)
            lp = logp[torch.arange(len(c), device=self.device), tgt].double().cpu().numpy()
            out.append((lp, bool((logp.argmax(-1) == tgt).all())) if with_greedy else lp)
        return out

    @torch.no_grad()
    def next_token_logprobs(self, prompt_ids: list[int], pixel_values: torch.Tensor | None) -> np.ndarray:
        """``(V,)`` float64 log-probabilities of the token that follows the prompt (one forward, the last
        position's logits only): what first-token option scoring reads."""
        ids = torch.tensor([prompt_ids], device=self.device)
        pv = pixel_values.to(self.device, self.model.dtype) if pixel_values is not None else None
        logits = self.model(input_ids=ids, pixel_values=pv, logits_to_keep=1).logits[0, -1]
        return torch.log_softmax(logits.float(), dim=-1).double().cpu().numpy()

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], pixel_values: torch.Tensor | None, max_new_tokens: int = 32,
               ) -> tuple[list[int], list[float], bool]:
        """Greedy decoding with the KV cache until a stop token: (answer ids without the stop token,
        log-probability of every chosen token including the stop token, stopped)."""
        ids = torch.tensor([prompt_ids], device=self.device)
        pv = pixel_values.to(self.device, self.model.dtype) if pixel_values is not None else None
        out = self.model(input_ids=ids, pixel_values=pv, use_cache=True, logits_to_keep=1)
        tokens, logps = [], []
        for _ in range(max_new_tokens):
            logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            tok = int(logp.argmax())
            logps.append(float(logp[tok]))
            if tok in self.stop_ids:
                return tokens, logps, True
            tokens.append(tok)
            out = self.model(input_ids=torch.tensor([[tok]], device=self.device),
                             past_key_values=out.past_key_values, use_cache=True)
        return tokens, logps, False

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @torch.no_grad()
    def pooled_hidden_states(self, prompt_ids: list[int], pixel_values: torch.Tensor | None) -> np.ndarray:
        """``(num_layers + 1, H)``: the decoder's hidden states (embeddings, then each layer's output)
        mean-pooled over all positions of the prompt, image slots included."""
        ids = torch.tensor([prompt_ids], device=self.device)
        pv = pixel_values.to(self.device, self.model.dtype) if pixel_values is not None else None
        hs = self.model(input_ids=ids, pixel_values=pv, output_hidden_states=True, logits_to_keep=1).hidden_states
        return torch.stack([h[0].float().mean(dim=0) for h in hs]).double().cpu().numpy()
