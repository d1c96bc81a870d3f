"""Score replies with a trained reward model (reward_modeling.py's output: a LoRA adapter with its `score` head, a
merged folder, or a full model). Used by PPO and for evaluation.

    from medgpt.reward import RewardScorer
    scorer = RewardScorer("outputs-rm")                   # adapter: its base model is read from adapter_config.json
    prompt = scorer.build_prompt([{"role": "user", "content": "I have a fever, what should I do?"}])
    scorer.score([prompt], ["Rest, drink fluids and see a doctor if it lasts more than three days."])  # tensor([r])

`prompts` are already rendered with the chat template (up to the assistant header, as generation sees them);
`responses` are the raw assistant text, without the end-of-turn marker: the scorer appends the template's
end-of-turn itself (e.g. "<|im_end|>\\n" for chatml) because the model was trained on replies that end with it.
A response that already ends with the template's stop string (e.g. "<|im_end|>") is taken without it first.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

import torch

from .data.preference import eos_text, render_prompt, reply_text, split_tokenize
from .default_model import DEFAULT_TEMPLATE, is_default, resolve_model_path

logger = logging.getLogger(__name__)


class RewardScorer:
    """A reward model with its tokenizer and chat template; `score(prompts, responses)` -> one float per pair."""

    def __init__(self, path_or_adapter: str, base_model: Optional[str] = None, device: Optional[str] = None,
                 template_name: Optional[str] = None, max_length: Optional[int] = None, batch_size: int = 8,
                 torch_dtype: Optional[str] = None, trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .generation import _has_tokenizer, read_run_info
        from .modeling import resolve_dtype
        from .templates import get_conv_template

        if not os.path.isdir(path_or_adapter):
            raise FileNotFoundError(2, "no such reward model folder", path_or_adapter)
        adapter_cfg = os.path.join(path_or_adapter, "adapter_config.json")
        is_adapter = os.path.isfile(adapter_cfg)
        if is_adapter and base_model is None:
            with open(adapter_cfg, encoding="utf-8") as f:
                base_model = json.load(f).get("base_model_name_or_path")
        info = read_run_info(path_or_adapter)
        if template_name is None:
            template_name = info.get("template_name") or (DEFAULT_TEMPLATE if is_default(base_model) else "vicuna")
        self.template = get_conv_template(template_name)
        self.max_length = max_length if max_length is not None else info.get("max_length")
        self.batch_size = batch_size

        model_path = resolve_model_path(base_model) if is_adapter else path_or_adapter
        tok_path = path_or_adapter if _has_tokenizer(path_or_adapter) else model_path
        self.tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token or self.tokenizer.eos_token

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = resolve_dtype(torch_dtype) if self.device.type == "cuda" or torch_dtype else torch.float32
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        if is_adapter:  # the base has no `score` weights yet (they come with the adapter): no "MISSING" report
            hf_logging.set_verbosity_error()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                model_path, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code)
        finally:
            hf_logging.set_verbosity(verbosity)
        if is_adapter:
            from peft import PeftModel

            # the adapter carries the trained `score` head (modules_to_save); merge for plain, faster forwards
            model = PeftModel.from_pretrained(model, path_or_adapter).merge_and_unload()
        # the score is read at the last non-pad token, as in training
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self.device).eval()

    def build_prompt(self, messages: list[dict]) -> str:
        """Render role/content messages (ending with a user turn) as the prompt the reward model was trained on."""
        return render_prompt(self.template, messages, eos_text(self.tokenizer))

    def encode(self, prompt: str, response: str) -> list[int]:
        """Token ids of prompt + response + end-of-turn, tokenized as in training; too long for max_length: the
        reply keeps its start and the prompt its end."""
        stop = self.template.stop_str
        if stop and response.rstrip().endswith(stop):
            response = response.rstrip()[: -len(stop)]
        prompt_ids, reply_ids = split_tokenize(
            self.tokenizer, prompt, reply_text(self.template, response, eos_text(self.tokenizer)))
        if self.max_length and len(prompt_ids) + len(reply_ids) > self.max_length:
            reply_ids = reply_ids[: max(self.max_length - len(prompt_ids), min(len(reply_ids), self.max_length // 2))]
            prompt_ids = prompt_ids[len(prompt_ids) + len(reply_ids) - self.max_length:]
        return prompt_ids + reply_ids

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Rewards (float32, on the CPU), one per (prompt, response) pair."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        sequences = [self.encode(p, r) for p, r in zip(prompts, responses)]
        out = []
        pad = self.tokenizer.pad_token_id
        for i in range(0, len(sequences), self.batch_size):
            batch = sequences[i: i + self.batch_size]
            width = max(len(s) for s in batch)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch], device=self.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch], device=self.device)
            out.append(self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score_messages(self, conversations: Sequence[list[dict]], responses: Sequence[str]) -> torch.Tensor:
        """Like score(), with role/content conversations (each ending with a user turn) instead of rendered prompts."""
        return self.score([self.build_prompt(m) for m in conversations], responses)


def load_reward_model(path: str, base_model: Optional[str] = None, **kwargs) -> RewardScorer:
    """A RewardScorer for reward_modeling.py's output folder (adapter or full/merged model)."""
    return RewardScorer(path, base_model=base_model, **kwargs)
