"""The chat-template registry: structure of every template, published chat_template fixtures, SmolLM2 ids."""
from __future__ import annotations

from pathlib import Path

import pytest

import template as top_level
from medgpt.templates import Conversation, get_conv_template, list_templates, register_conv_template

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"

EXPECTED_NAMES = {
    # MedicalGPT's supported-models table
    "alpaca", "baichuan", "baichuan2", "chatglm", "chatglm2", "chatglm3", "chatml", "cohere", "deepseek",
    "deepseek3", "intern2", "llama2", "llama3", "mistral", "orion", "qwen", "vicuna", "xverse", "yi",
    # the other families MedicalGPT ships
    "base", "ziya", "linly", "phoenix", "belle", "aquila", "intern", "starchat", "llama2-zh", "deepseekcoder",
    "zephyr", "gemma", "qwen3",
}

SYSTEM = "SYS-alpha: you are a careful medical assistant."
USERS = ["U1-what causes a fever?", "U2-and a cough {braces}?", "U3-thanks, anything else?"]
ANSWERS = ["A1-usually an infection.", "A2-often a virus {not a placeholder}.", "A3-rest and fluids."]


def conversation(turns: int = 3, system: str | None = SYSTEM, last_answer: bool = True) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system is not None else []
    for i in range(turns):
        msgs.append({"role": "user", "content": USERS[i]})
        if i < turns - 1 or last_answer:
            msgs.append({"role": "assistant", "content": ANSWERS[i]})
    return msgs


# --------------------------------------------------------------------------- registry
def test_registry_has_every_family_and_toplevel_reexports():
    names = list_templates()
    assert names == sorted(names)
    assert EXPECTED_NAMES <= set(names), f"missing: {sorted(EXPECTED_NAMES - set(names))}"
    assert top_level.get_conv_template is get_conv_template
    assert set(top_level.__all__) >= {"Conversation", "register_conv_template", "get_conv_template", "list_templates"}


def test_unknown_template_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_conv_template("no-such-template")
    msg = str(err.value)
    assert "Unknown template 'no-such-template'" in msg
    assert "Valid names: " + ", ".join(list_templates()) in msg
    for name in ("alpaca", "chatml", "llama3", "qwen", "vicuna", "zephyr"):
        assert name in msg


def test_get_returns_a_copy_and_register_refuses_silent_override():
    conv = get_conv_template("chatml")
    conv.system_prompt = "changed"
    conv.messages.append(["q", "a"])
    fresh = get_conv_template("chatml")
    assert fresh.system_prompt == "You are a helpful assistant."
    assert fresh.messages == []
    with pytest.raises(ValueError):
        register_conv_template(Conversation(name="chatml"))
    custom = Conversation(name="test-custom-template", system_prompt="", user_template="Q: {query}\n",
                          assistant_header="A: ", assistant_template="{answer}{eos}\n", stop_str=None)
    register_conv_template(custom)
    try:
        assert "test-custom-template" in list_templates()
        assert get_conv_template("test-custom-template").render(conversation(1, None), eos_token="<E>") == \
            "Q: U1-what causes a fever?\nA: A1-usually an infection.<E>\n"
        register_conv_template(Conversation(name="test-custom-template", user_template="{query}"), override=True)
        assert get_conv_template("test-custom-template").user_template == "{query}"
    finally:
        from medgpt.templates import conv_templates
        conv_templates.pop("test-custom-template", None)


# --------------------------------------------------------------------------- every template
@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_template_structure(name):
    conv = get_conv_template(name)
    msgs = conversation(3)
    text = conv.render(msgs)
    segs = conv.segments(msgs)

    assert text.strip()
    assert "".join(t for t, _ in segs) == text
    assert all(t for t, _ in segs), "no empty pieces"
    assert all(a != b for (_, a), (_, b) in zip(segs, segs[1:])), "adjacent pieces alternate"

    # every content appears, in order
    pos = 0
    for content in [SYSTEM] + [c for pair in zip(USERS, ANSWERS) for c in pair]:
        found = text.find(content, pos)
        assert found >= 0, f"{content!r} missing or out of order in {text!r}"
        pos = found + len(content)

    # the trained pieces: one per reply, each holding exactly that reply plus the same end-of-turn marker
    replies = [t for t, is_assistant in segs if is_assistant]
    assert len(replies) == len(ANSWERS)
    residues = set()
    for piece, answer in zip(replies, ANSWERS):
        assert answer in piece
        assert not any(other in piece for other in ANSWERS if other != answer)
        assert not any(u in piece for u in USERS) and SYSTEM not in piece
        residues.add(piece.replace(answer, "\0"))
    assert len(residues) == 1, f"the end-of-turn marker differs between turns: {residues}"
    for t, is_assistant in segs:
        if not is_assistant:
            assert not any(a in t for a in ANSWERS)

    # a system prompt given as argument renders like a leading system message
    assert conv.render(msgs[1:], system_prompt=SYSTEM) == text
    # "" means no system prompt at all
    assert SYSTEM not in conv.render(msgs[1:], system_prompt="")

    # MedicalGPT API: [[user, assistant], ...]
    pairs = [[u, a] for u, a in zip(USERS, ANSWERS)]
    prompt = conv.get_prompt(pairs, system_prompt=SYSTEM)
    dialog = conv.get_dialog(pairs, system_prompt=SYSTEM)
    assert prompt == text
    assert "".join(dialog) == prompt
    assert len(dialog) == 2 * len(pairs)
    assert dialog[1::2] == replies

    # generation prompt: the last answer is "" (or None)
    gen_pairs = pairs[:2] + [[USERS[2], ""]]
    gen = conv.get_prompt(gen_pairs, system_prompt=SYSTEM)
    gen_dialog = conv.get_dialog(gen_pairs, system_prompt=SYSTEM)
    assert "".join(gen_dialog) == gen and len(gen_dialog) == 6 and gen_dialog[-1] == ""
    assert ANSWERS[2] not in gen and USERS[2] in gen
    assert text.startswith(gen), "the generation prompt is the full text up to the last reply"
    assert text[len(gen):] == replies[-1]
    assert conv.get_prompt(pairs[:2] + [[USERS[2], None]], system_prompt=SYSTEM) == gen
    assert conv.render(conversation(3, SYSTEM, last_answer=False), add_generation_prompt=True) == gen

    # MedicalGPT convention: get_prompt's empty system prompt falls back to the template default
    assert conv.get_prompt(pairs) == conv.render(msgs[1:])

    if conv.stop_str:
        assert conv.stop_str in text
        # the stop string ends a trained reply, or (chatglm3: "<|user|>") opens the turn after it
        after_reply = segs[[a for _, a in segs].index(True) + 1][0]
        assert conv.stop_str in replies[0] or after_reply.startswith(conv.stop_str)


def test_eos_placeholder_and_reply_pieces():
    msgs = conversation(2, None)
    alpaca = get_conv_template("alpaca")
    assert [t for t, a in alpaca.segments(msgs, eos_token="<|endoftext|>") if a] == \
        [ANSWERS[0] + "<|endoftext|>", ANSWERS[1] + "<|endoftext|>"]
    assert "</s>" in alpaca.get_prompt([[USERS[0], ANSWERS[0]]])
    chatml = get_conv_template("chatml")
    assert [t for t, a in chatml.segments(msgs) if a] == [ANSWERS[0] + "<|im_end|>\n", ANSWERS[1] + "<|im_end|>\n"]
    llama2 = get_conv_template("llama2")
    assert [t for t, a in llama2.segments(msgs) if a] == [f" {ANSWERS[0]} </s>", f" {ANSWERS[1]} </s>"]


def test_exact_chatml_and_llama3_layout():
    msgs = conversation(1, "S")
    assert get_conv_template("chatml").render(msgs) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n" + USERS[0] + "<|im_end|>\n"
        "<|im_start|>assistant\n" + ANSWERS[0] + "<|im_end|>\n")
    assert get_conv_template("llama3").render(msgs) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n" + USERS[0] + "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n" + ANSWERS[0] + "<|eot_id|>")
    assert get_conv_template("chatml").render(msgs[1:]).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


@pytest.mark.parametrize("name,expected", [
    ("alpaca", "S\n\n### Instruction:\nq1\n\n### Response:\na1</s>\n\n### Instruction:\nq2\n\n### Response:\n"),
    ("vicuna", "S USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"),  # FastChat vicuna_v1.1
    ("llama2", "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nq1 [/INST] a1 </s><s>[INST] q2 [/INST]"),
    ("chatglm2", "S\n\n[Round 1]\n\n问：q1\n\n答：a1</s>\n\n[Round 2]\n\n问：q2\n\n答："),
    ("zephyr", "<|system|>\nS</s>\n<|user|>\nq1</s>\n<|assistant|>\na1</s>\n<|user|>\nq2</s>\n<|assistant|>\n"),
    ("deepseek3", "<｜begin▁of▁sentence｜>S<｜User｜>q1<｜Assistant｜>a1<｜end▁of▁sentence｜><｜User｜>q2<｜Assistant｜>"),
], ids=lambda v: v if v in EXPECTED_NAMES else "")
def test_exact_multiturn_layout(name, expected):
    pairs = [["q1", "a1"], ["q2", ""]]
    assert get_conv_template(name).get_prompt(pairs, system_prompt="S") == expected


def test_trailing_user_without_generation_prompt_and_bad_roles():
    conv = get_conv_template("chatml")
    msgs = conversation(1, "S", last_answer=False)
    assert conv.render(msgs).endswith(USERS[0] + "<|im_end|>\n")
    assert conv.render(msgs, add_generation_prompt=True).endswith(USERS[0] + "<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError):
        conv.render([{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError):
        conv.render([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}])


# --------------------------------------------------------------------------- published chat templates
def render_published(name: str, messages: list[dict], add_generation_prompt: bool, bos: str, eos: str) -> str:
    """Render a published chat_template the way transformers does."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    source = (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
    return env.from_string(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          bos_token=bos, eos_token=eos)


# (template, bos_token, eos_token, what the published template does with a system message, text our
# template writes before the published rendering)
PUBLISHED = [
    ("llama3", "<|begin_of_text|>", "<|eot_id|>", "renders", ""),        # meta-llama/Meta-Llama-3-8B-Instruct
    ("qwen", "", "<|im_end|>", "renders", ""),                           # Qwen/Qwen2.5-*-Instruct
    ("mistral", "<s>", "</s>", "raises", ""),                            # mistralai/Mistral-7B-Instruct-v0.1/v0.2
    # google/gemma-7b-it: its template leaves <bos> to the tokenizer; gemma-2/3 templates write it, as we do
    ("gemma", "<bos>", "<eos>", "raises", "<bos>"),
    ("cohere", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "renders", ""),   # CohereForAI/c4ai-command-r-plus
    ("deepseekcoder", "<｜begin▁of▁sentence｜>", "<|EOT|>", "renders", ""),  # deepseek-ai/deepseek-coder-33b-instruct
    ("orion", "<s>", "</s>", "drops", ""),                               # OrionStarAI/Orion-14B-Chat
]


@pytest.mark.parametrize("name,bos,eos,system_support,extra", PUBLISHED, ids=[p[0] for p in PUBLISHED])
@pytest.mark.parametrize("with_system", [True, False], ids=["system", "default-system"])
def test_matches_published_chat_template(name, bos, eos, system_support, extra, with_system):
    if with_system and system_support != "renders":
        if system_support == "raises":
            import jinja2
            with pytest.raises(jinja2.exceptions.TemplateError):
                render_published(name, conversation(2, SYSTEM), False, bos, eos)
        else:
            assert SYSTEM not in render_published(name, conversation(2, SYSTEM), False, bos, eos)
        pytest.skip(f"the published {name} template has no system message (it {system_support} it)")
    conv = get_conv_template(name)
    system = SYSTEM if with_system else None  # None: our default system prompt vs the template's own default

    full = conversation(3, system)
    assert conv.render(full, eos_token=eos) == extra + render_published(name, full, False, bos, eos)

    pending = conversation(3, system, last_answer=False)
    expected = extra + render_published(name, pending, True, bos, eos)
    assert conv.render(pending, add_generation_prompt=True, eos_token=eos) == expected
    if system is None:
        pairs = [[u, a] for u, a in zip(USERS, ANSWERS)]
        pairs[-1][1] = ""
        assert conv.get_prompt(pairs) == expected


# --------------------------------------------------------------------------- the embedded SmolLM2 tokenizer
@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from medgpt.default_model import default_model_path
    return AutoTokenizer.from_pretrained(default_model_path())


def _ids(encoded):
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5, a list before."""
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


@pytest.mark.parametrize("generation", [False, True], ids=["full", "generation-prompt"])
def test_chatml_token_ids_match_smollm2_chat_template(smol_tok, generation):
    conv = get_conv_template("chatml")
    msgs = conversation(3, SYSTEM, last_answer=not generation)
    text = conv.render(msgs, add_generation_prompt=generation)
    ours = smol_tok(text, add_special_tokens=False)["input_ids"]
    theirs = _ids(smol_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation))
    assert ours == theirs
    assert smol_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation) == text
    # tokenizing piece by piece gives the same ids, so SFT label masks can be built from segments()
    by_piece = []
    for piece, _ in conv.segments(msgs, add_generation_prompt=generation):
        by_piece += smol_tok(piece, add_special_tokens=False)["input_ids"]
    assert by_piece == ours
