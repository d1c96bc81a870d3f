"""Chat-template registry: how each model family lays out a conversation as text.

A :class:`Conversation` describes one family's format with a handful of small string templates
(placeholders in braces are filled in; message contents are never parsed, so braces in them are safe):

* ``prefix``              literal text that opens the sequence (e.g. ``"<s>"``, ``"<|begin_of_text|>"``)
* ``system_template``     the system prompt as its own block, ``{system}``
* ``system_in_user``      alternatively, how the system prompt is merged into the *first* user turn
                          (``{system}`` and ``{query}``), as llama2 / mistral / gemma do; when set,
                          ``system_template`` is not used
* ``user_template``       a user turn, ``{query}`` (``{idx}`` / ``{idx1}``: 0-/1-based round number)
* ``assistant_header``    what follows a user turn and opens the reply; a generation prompt ends here
* ``assistant_template``  an assistant reply *including* its end-of-turn marker, ``{answer}`` and
                          ``{eos}`` (the tokenizer's eos text, for families that end turns with eos)
* ``turn_sep``            text between rounds (before every user turn but the first)
* ``stop_str``            string that ends an assistant turn during generation (``None``: tokenizer eos)

``segments()`` returns the rendering as ``(text, is_assistant)`` pieces: the pieces flagged True are
exactly what supervised fine-tuning trains on (each reply plus its end-of-turn marker).

``get_prompt()`` / ``get_dialog()`` keep MedicalGPT's call convention (``[[user, assistant], ...]``).
"""
from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .data.io import DataError

__all__ = ["Conversation", "register_conv_template", "get_conv_template", "list_templates"]

_PLACEHOLDER = re.compile(r"\{(system|query|answer|eos|idx1|idx)\}")


def _fill(template: str, **values: str) -> str:
    """Substitute the known placeholders of ``template`` in one pass (values are inserted verbatim)."""

    def repl(match: "re.Match[str]") -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"placeholder {{{key}}} has no value in template {template!r}")
        return values[key]

    return _PLACEHOLDER.sub(repl, template)


@dataclass
class Conversation:
    """One chat format. See the module docstring for what each field means."""

    name: str
    system_prompt: str = ""
    system_template: str = "{system}"
    system_in_user: Optional[str] = None
    user_template: str = "{query}"
    assistant_header: str = ""
    assistant_template: str = "{answer}{eos}"
    prefix: str = ""
    turn_sep: str = ""
    stop_str: Optional[str] = None
    # MedicalGPT compatibility: a conversation history used when get_prompt() gets no messages.
    messages: List[List[str]] = field(default_factory=list)
    roles: Tuple[str, str] = ("user", "assistant")

    # ------------------------------------------------------------------ core rendering
    def _pieces(
            self,
            messages: Sequence[dict],
            system_prompt: Optional[str],
            add_generation_prompt: bool,
            eos_token: str,
    ) -> List[Tuple[str, bool]]:
        """Strictly alternating pieces: [(before reply 0, False), (reply 0, True), ..., (tail, False)].

        The first piece holds prefix + system + first user turn + header; a reply piece may be ""."""
        messages = list(messages or [])
        if messages and messages[0].get("role") == "system":
            system = messages[0].get("content") or ""
            messages = messages[1:]
        else:
            system = self.system_prompt if system_prompt is None else system_prompt
        system = system or ""
        eos = "" if eos_token is None else eos_token

        for i, msg in enumerate(messages):
            role = msg.get("role")
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(
                    f"Template {self.name!r}: after an optional leading system message, roles must alternate "
                    f"user/assistant starting with user; message {i} has role {role!r}"
                )

        pieces: List[Tuple[str, bool]] = []
        current = self.prefix
        if system and self.system_in_user is None:
            current += _fill(self.system_template, system=system)
        n = len(messages)
        for i in range(0, n, 2):
            idx = i // 2
            query = messages[i].get("content") or ""
            if idx == 0 and system and self.system_in_user is not None:
                query = _fill(self.system_in_user, system=system, query=query)
            if idx > 0:
                current += self.turn_sep
            current += _fill(self.user_template, query=query, idx=str(idx), idx1=str(idx + 1))
            has_answer = i + 1 < n
            if has_answer or add_generation_prompt:
                current += _fill(self.assistant_header, idx=str(idx), idx1=str(idx + 1))
            if has_answer:
                answer = messages[i + 1].get("content") or ""
                pieces.append((current, False))
                pieces.append((_fill(self.assistant_template, answer=answer, eos=eos), True))
                current = ""
        pieces.append((current, False))
        return pieces

    def segments(
            self,
            messages: List[dict],
            system_prompt: Optional[str] = None,
            add_generation_prompt: bool = False,
            eos_token: str = "</s>",
    ) -> List[Tuple[str, bool]]:
        """Render ``messages`` as consecutive ``(text, is_assistant)`` pieces (see module docstring).

        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``; a leading system
        message overrides ``system_prompt``; then user/assistant alternate starting with user.
        ``system_prompt=None`` uses this template's default, ``""`` renders no system prompt.
        With ``add_generation_prompt`` and a trailing user message, the text ends with the assistant
        header. ``eos_token`` fills ``{eos}`` in templates that end a reply with the tokenizer's eos.
        """
        out: List[Tuple[str, bool]] = []
        for text, is_assistant in self._pieces(messages, system_prompt, add_generation_prompt, eos_token):
            if not text:
                continue
            if out and out[-1][1] == is_assistant:
                out[-1] = (out[-1][0] + text, is_assistant)
            else:
                out.append((text, is_assistant))
        return out

    def render(
            self,
            messages: List[dict],
            system_prompt: Optional[str] = None,
            add_generation_prompt: bool = False,
            eos_token: str = "</s>",
    ) -> str:
        """The full text: ``"".join`` of :meth:`segments`."""
        return "".join(text for text, _ in self.segments(messages, system_prompt, add_generation_prompt, eos_token))

    # ------------------------------------------------------------------ MedicalGPT-compatible API
    @staticmethod
    def _pairs_to_messages(pairs: Sequence[Sequence[Optional[str]]]) -> Tuple[List[dict], bool]:
        messages: List[dict] = []
        generation = False
        pairs = list(pairs)
        for k, pair in enumerate(pairs):
            pair = list(pair)
            if len(pair) == 1:
                pair.append(None)
            if len(pair) != 2:
                raise ValueError(f"each message must be a [user, assistant] pair, got {pair!r}")
            query, answer = pair
            messages.append({"role": "user", "content": query or ""})
            if k == len(pairs) - 1 and (answer is None or answer == ""):
                generation = True
            else:
                messages.append({"role": "assistant", "content": answer or ""})
        return messages, generation

    def _dialog(self, messages, system_prompt) -> List[str]:
        pairs = messages if messages else self.messages
        msgs, generation = self._pairs_to_messages(pairs)
        # MedicalGPT convention: an empty/None system prompt means "use the template default".
        system = system_prompt if system_prompt else None
        # pieces = [prompt_0, response_0, ..., tail]: the tail is the pending prompt of a generation
        # request, else "" (nothing follows the last reply) unless there is no round at all.
        texts = [text for text, _ in self._pieces(msgs, system, generation, "</s>")]
        tail = texts.pop()
        if generation or not texts:
            texts.extend([tail, ""] if (tail or texts) else [])
        else:
            texts[-1] += tail
        return texts

    def get_prompt(self, messages: Optional[List[Sequence[str]]] = None, system_prompt: Optional[str] = "") -> str:
        """Full text for ``messages = [[user, assistant], ...]``; a last pair whose assistant is ""/None
        renders up to the assistant header (a generation prompt). Empty ``system_prompt``: the default."""
        return "".join(self._dialog(messages, system_prompt))

    def get_dialog(self, messages: Optional[List[Sequence[str]]] = None,
                   system_prompt: Optional[str] = "") -> List[str]:
        """``[prompt_0, response_0, prompt_1, response_1, ...]`` whose concatenation is :meth:`get_prompt`;
        each response includes its end-of-turn marker, each prompt everything before that reply."""
        return self._dialog(messages, system_prompt)

    def append_message(self, query: str, answer: str) -> None:
        """Append a [query, answer] round to the stored history (MedicalGPT compatibility)."""
        self.messages.append([query, answer])


# ---------------------------------------------------------------------- registry
conv_templates: Dict[str, Conversation] = {}


def register_conv_template(template: Conversation, override: bool = False) -> None:
    """Register ``template`` under ``template.name``; re-registering a name needs ``override=True``."""
    if template.name in conv_templates and not override:
        raise ValueError(f"Template {template.name!r} is already registered (pass override=True to replace it)")
    conv_templates[template.name] = template


def list_templates() -> List[str]:
    """All registered template names, sorted."""
    return sorted(conv_templates)


class UnknownTemplateError(DataError):
    """An unknown template name (a ValueError; the scripts print its one line instead of a traceback)."""


def get_conv_template(name: str) -> Conversation:
    """A copy of the registered template ``name``; an unknown name raises UnknownTemplateError, one line naming the
    close matches and listing the valid names."""
    if name not in conv_templates:
        close = difflib.get_close_matches(str(name).lower(), list_templates(), n=3, cutoff=0.6)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise UnknownTemplateError(f"Unknown template {name!r}{hint}. Valid names: {', '.join(list_templates())}")
    return copy.deepcopy(conv_templates[name])


# ---------------------------------------------------------------------- the families
_CHATML_SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n"
_CHATML_USER = "<|im_start|>user\n{query}<|im_end|>\n"
_CHATML_HEADER = "<|im_start|>assistant\n"
_CHATML_REPLY = "{answer}<|im_end|>\n"


def _chatml(name: str, system_prompt: str, prefix: str = "") -> Conversation:
    return Conversation(
        name=name, system_prompt=system_prompt, prefix=prefix,
        system_template=_CHATML_SYSTEM, user_template=_CHATML_USER,
        assistant_header=_CHATML_HEADER, assistant_template=_CHATML_REPLY, stop_str="<|im_end|>",
    )


_LLAMA2_DEFAULT_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, "
    "dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive "
    "in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why "
    "instead of answering something not correct. If you don't know the answer to a question, please "
    "don't share false information."
)
_DEEPSEEK_BOS = "<｜begin▁of▁sentence｜>"
_DEEPSEEK_EOS = "<｜end▁of▁sentence｜>"
_INTERNLM2_SYSTEM = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI Laboratory "
    "(上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the user "
    "such as English and 中文."
)

_BUILTIN = [
    # Plain continuation (few-shot / pretrained base models): replies end with the tokenizer's eos.
    Conversation(name="base", system_template="{system}\n\n", user_template="{query}",
                 assistant_template="{answer}{eos}"),
    # Stanford Alpaca.
    Conversation(
        name="alpaca",
        system_prompt="Below is an instruction that describes a task. "
                      "Write a response that appropriately completes the request.",
        system_template="{system}\n\n", user_template="### Instruction:\n{query}\n\n",
        assistant_header="### Response:\n", assistant_template="{answer}{eos}", turn_sep="\n\n",
    ),
    # Vicuna v1.1 (FastChat): "SYS USER: q ASSISTANT: a</s>USER: ..."; generation prompt ends with "ASSISTANT:".
    Conversation(
        name="vicuna",
        system_prompt="A chat between a curious user and an artificial intelligence assistant. "
                      "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        system_template="{system} ", user_template="USER: {query} ", assistant_header="ASSISTANT:",
        assistant_template=" {answer}{eos}", roles=("USER", "ASSISTANT"),
    ),
    # Baichuan-13B-Chat: user/assistant are the reserved tokens 195/196, replies end with eos.
    Conversation(name="baichuan", user_template="<reserved_102>{query}", assistant_header="<reserved_103>",
                 assistant_template="{answer}</s>", roles=("<reserved_102>", "<reserved_103>")),
    # Baichuan2-*-Chat: reserved tokens 106/107.
    Conversation(name="baichuan2", user_template="<reserved_106>{query}", assistant_header="<reserved_107>",
                 assistant_template="{answer}</s>", roles=("<reserved_106>", "<reserved_107>")),
    # ChatGLM-6B build_prompt: "[Round 0]\n问：q\n答：a\n[Round 1]\n问：..." (rounds counted from 0).
    Conversation(name="chatglm", system_template="{system}\n", user_template="[Round {idx}]\n问：{query}\n",
                 assistant_header="答：", assistant_template="{answer}{eos}", turn_sep="\n", roles=("问", "答")),
    # ChatGLM2-6B build_prompt: "[Round 1]\n\n问：q\n\n答：a\n\n[Round 2]..." (rounds counted from 1).
    Conversation(name="chatglm2", system_template="{system}\n\n", user_template="[Round {idx1}]\n\n问：{query}\n\n",
                 assistant_header="答：", assistant_template="{answer}{eos}", turn_sep="\n\n", roles=("问", "答")),
    # ChatGLM3-6B: "<|system|>\nS<|user|>\nq<|assistant|>\na"; the tokenizer adds [gMASK]sop itself.
    Conversation(name="chatglm3", system_template="<|system|>\n{system}", user_template="<|user|>\n{query}",
                 assistant_header="<|assistant|>", assistant_template="\n{answer}{eos}", stop_str="<|user|>",
                 roles=("<|user|>", "<|assistant|>")),
    # ChatML (OpenAI / many fine-tunes; the embedded SmolLM2 default model uses it).
    _chatml("chatml", "You are a helpful assistant."),
    # Qwen2.5-Instruct (ChatML with Qwen's default system prompt).
    _chatml("qwen", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    # Qwen3: ChatML, no default system prompt. (The published template also inserts an empty
    # "<think>\n\n</think>\n\n" block in the final reply; that reasoning markup is not modelled here.)
    _chatml("qwen3", ""),
    # Yi-*-Chat: ChatML, no default system prompt.
    _chatml("yi", ""),
    # InternLM2-chat: ChatML after the bos text.
    _chatml("intern2", _INTERNLM2_SYSTEM, prefix="<s>"),
    # Cohere Command-R(+).
    Conversation(
        name="cohere", prefix="<BOS_TOKEN>",
        system_template="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>",
        user_template="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{query}<|END_OF_TURN_TOKEN|>",
        assistant_header="<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
        assistant_template="{answer}<|END_OF_TURN_TOKEN|>", stop_str="<|END_OF_TURN_TOKEN|>",
        roles=("User", "Assistant"),
    ),
    # DeepSeek-LLM-Chat / DeepSeek-MoE-Chat: "User: q\n\nAssistant: a<eos>"; generation ends at "Assistant:".
    Conversation(name="deepseek", prefix=_DEEPSEEK_BOS, system_template="{system}\n\n",
                 user_template="User: {query}\n\n", assistant_header="Assistant:",
                 assistant_template=" {answer}" + _DEEPSEEK_EOS, stop_str=_DEEPSEEK_EOS, roles=("User", "Assistant")),
    # DeepSeek-V3 / R1.
    Conversation(name="deepseek3", prefix=_DEEPSEEK_BOS, system_template="{system}",
                 user_template="<｜User｜>{query}", assistant_header="<｜Assistant｜>",
                 assistant_template="{answer}" + _DEEPSEEK_EOS, stop_str=_DEEPSEEK_EOS,
                 roles=("<｜User｜>", "<｜Assistant｜>")),
    # DeepSeek-Coder-Instruct.
    Conversation(
        name="deepseekcoder", prefix=_DEEPSEEK_BOS,
        system_prompt="You are an AI programming assistant, utilizing the Deepseek Coder model, developed by "
                      "Deepseek Company, and you only answer questions related to computer science. For politically "
                      "sensitive questions, security and privacy issues, and other non-computer science questions, "
                      "you will refuse to answer\n",
        system_template="{system}", user_template="### Instruction:\n{query}\n", assistant_header="### Response:\n",
        assistant_template="{answer}\n<|EOT|>\n", stop_str="<|EOT|>", roles=("### Instruction", "### Response"),
    ),
    # Llama-2-chat: the system prompt goes inside the first [INST]; every round starts with bos.
    Conversation(name="llama2", system_prompt=_LLAMA2_DEFAULT_SYSTEM,
                 system_in_user="<<SYS>>\n{system}\n<</SYS>>\n\n{query}", user_template="<s>[INST] {query} [/INST]",
                 assistant_template=" {answer} </s>", stop_str="</s>", roles=("[INST]", "[/INST]")),
    # Chinese-LLaMA-Alpaca-2 (llama2 layout, bilingual default system prompt).
    Conversation(name="llama2-zh", system_prompt="You are a helpful assistant. 你是一个乐于助人的助手。",
                 system_in_user="<<SYS>>\n{system}\n<</SYS>>\n\n{query}", user_template="<s>[INST] {query} [/INST]",
                 assistant_template=" {answer} </s>", stop_str="</s>", roles=("[INST]", "[/INST]")),
    # Meta-Llama-3(.x)-Instruct.
    Conversation(
        name="llama3", prefix="<|begin_of_text|>",
        system_template="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        user_template="<|start_header_id|>user<|end_header_id|>\n\n{query}<|eot_id|>",
        assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_template="{answer}<|eot_id|>", stop_str="<|eot_id|>",
    ),
    # Mistral-7B-Instruct v0.1/v0.2: "<s>[INST] q [/INST]a</s>[INST] ..."; its template has no system
    # role, so a system prompt is put in front of the first user message (as mistral-common does).
    Conversation(name="mistral", prefix="<s>", system_in_user="{system}\n\n{query}",
                 user_template="[INST] {query} [/INST]", assistant_template="{answer}</s>", stop_str="</s>",
                 roles=("[INST]", "[/INST]")),
    # Zephyr (HuggingFaceH4/zephyr-7b-beta).
    Conversation(name="zephyr", system_template="<|system|>\n{system}</s>\n", user_template="<|user|>\n{query}</s>\n",
                 assistant_header="<|assistant|>\n", assistant_template="{answer}</s>\n", stop_str="</s>"),
    # Gemma-it: no system role, the system prompt is put in front of the first user message.
    Conversation(name="gemma", prefix="<bos>", system_in_user="{system}\n\n{query}",
                 user_template="<start_of_turn>user\n{query}<end_of_turn>\n", assistant_header="<start_of_turn>model\n",
                 assistant_template="{answer}<end_of_turn>\n", stop_str="<end_of_turn>", roles=("user", "model")),
    # Orion-14B-Chat: "<s>Human: q\n\nAssistant: </s>a</s>".
    Conversation(name="orion", prefix="<s>", system_in_user="{system}\n\n{query}", user_template="Human: {query}\n\n",
                 assistant_header="Assistant: </s>", assistant_template="{answer}</s>", stop_str="</s>",
                 roles=("Human", "Assistant")),
    # XVERSE-*-Chat.
    Conversation(name="xverse", system_template="{system}\n\n", user_template="Human: {query}\n\n",
                 assistant_header="Assistant: ", assistant_template="{answer}<|endoftext|>",
                 stop_str="<|endoftext|>", roles=("Human", "Assistant")),
    # Ziya-LLaMA.
    Conversation(name="ziya", system_template="{system}\n", user_template="<human>:{query}\n",
                 assistant_header="<bot>:", assistant_template="{answer}{eos}", turn_sep="\n",
                 roles=("<human>", "<bot>")),
    # Linly-Chinese-LLaMA.
    Conversation(name="linly", system_template="{system}\n", user_template="User: {query}\n",
                 assistant_header="Bot: ", assistant_template="{answer}{eos}", turn_sep="\n", roles=("User", "Bot")),
    # Phoenix (LLMZoo).
    Conversation(
        name="phoenix",
        system_prompt="A chat between a curious human and an artificial intelligence assistant. "
                      "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        system_template="{system}\n\n", user_template="Human: <s>{query}</s>", assistant_header="Assistant: <s>",
        assistant_template="{answer}</s>", roles=("Human", "Assistant"),
    ),
    # BELLE.
    Conversation(name="belle", system_template="{system}\n\n", user_template="Human: {query}\n\n",
                 assistant_header="Belle: ", assistant_template="{answer}{eos}", turn_sep="\n\n",
                 roles=("Human", "Belle")),
    # AquilaChat (FastChat "aquila": "SYS###Human: q###Assistant: a###").
    Conversation(
        name="aquila",
        system_prompt="A chat between a curious human and an artificial intelligence assistant. "
                      "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        system_template="{system}###", user_template="Human: {query}###", assistant_header="Assistant:",
        assistant_template=" {answer}###", stop_str="###", roles=("Human", "Assistant"),
    ),
    # InternLM (v1) chat.
    Conversation(name="intern", system_template="<|System|>:{system}\n", user_template="<s><|User|>:{query}<eoh>\n",
                 assistant_header="<|Bot|>:", assistant_template="{answer}<eoa>\n", stop_str="<eoa>",
                 roles=("<|User|>", "<|Bot|>")),
    # StarChat-alpha/beta.
    Conversation(name="starchat", system_template="<|system|>\n{system}<|end|>\n",
                 user_template="<|user|>\n{query}<|end|>\n", assistant_header="<|assistant|>\n",
                 assistant_template="{answer}<|end|>\n", stop_str="<|end|>", roles=("<|user|>", "<|assistant|>")),
]

for _template in _BUILTIN:
    register_conv_template(_template)
del _template
