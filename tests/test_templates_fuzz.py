"""Chat templates on seeded random conversations, against references (tests/test_templates.py proves
fixed conversations; its Qwen2 template, Meta reference and run splitter are reused here).

Each draw: an optional system turn, 1-6 turns, ending with the assistant (render, as Jinja's
add_generation_prompt=False) or the user (render_prompt, add_generation_prompt=True); texts mix
words, CJK, emoji, combining marks, newlines, tabs, leading/trailing spaces, empty strings and the
templates' own markup ("<|im_end|>", "<s>", "[/INST]", "\\nAssistant:"). Broken conversations (two
user turns, an assistant first, a system turn later, an unknown role, a wrong final turn, no content)
must be refused naming the message index and what was expected.
- chatml: text equal to transformers' apply_chat_template of Qwen2's Jinja template (for another
  default system, the same template with that default); ids equal transformers' tokenization of
  that text, where the message text is split as text (split_special_tokens) and only the
  template's own <|im_start|>/<|im_end|> are tokens; the loss mask equal to
  return_assistant_tokens_mask of the Qwen2 template with {% generation %} around reply + <|im_end|>.
- llama2: ids equal Meta's chat_completion encoding (test_templates.meta_llama2_dialog_tokens); the
  supervised run of each turn is what Meta's turn encoding holds past its "[INST] .. [/INST]" part.
- plain: ids equal the whole-turn encoding of the documented format, supervised the same way.
"""
from __future__ import annotations

import random
import re

import pytest
import sentencepiece as spm

from minipeft.templates import IGNORE_INDEX, ChatML, get_template
from test_templates import QWEN2_JINJA, meta_llama2_dialog_tokens, supervised_runs

SEED, DRAWS = 20240607, 300

# Qwen2's template with a `default_system` variable (None: no default turn) and a {% generation %}
# block around what minipeft supervises: the reply and its <|im_end|>, not the "\n" after it.
CHATML_GEN = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' and default_system is not none %}"
    "{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN_DEFAULT = "You are a helpful assistant."
DEFAULT_SYSTEMS = [QWEN_DEFAULT, None, "", "你是 a helpful 助手\n "]

ATOMS = {
    "word": ["the", "quick", "fox", "hello", "world", "answer", "User:", "Assistant:", "###", "1234", "3.14,"],
    "cjk": ["你好", "世界", "中文", "微调", "数据", "模型", "カタカナ", "한국어"],
    "other": ["naïve", "e\u0301", "Straße", "Привет", "🙂", "👍🏽", "🇫🇷", "∑√∞", "\u00a0", "\u3000", "\u200b"],
    "space": [" ", "  ", "\t", "\n", "\n\n", "\r\n", " \n "],
    "markup": ["<|im_end|>", "<|im_start|>", "<|im_start|>system\n", "<|im_end|>\n<|im_start|>user\n",
               "<|im_", "|>", "<s>", "</s>", "<unk>", "<pad>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",
               "\nAssistant:", "\nUser: "],
}


def random_text(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.07:
        return ""
    if r < 0.12:
        return rng.choice(ATOMS["space"])
    kinds = [k for k in ATOMS if k != "markup"]
    atoms = [rng.choice(ATOMS[rng.choice(kinds)]) for _ in range(rng.randint(1, 8))]
    if rng.random() < 0.1:  # one text in ten: about a third of the conversations hold markup
        atoms.insert(rng.randint(0, len(atoms)), rng.choice(ATOMS["markup"]))
    text = atoms[0] + "".join(a if rng.random() < 0.3 else " " + a for a in atoms[1:])
    if rng.random() < 0.2:
        text = rng.choice(ATOMS["space"]) + text + rng.choice(ATOMS["space"])
    return text


def random_conversation(rng: random.Random) -> tuple[list[dict], str]:
    """A well-formed conversation and how it ends: "assistant" (render) or "user" (render_prompt)."""
    final = rng.choice(["assistant", "user"])
    n = rng.randint(1, 6) * 2 - (final == "user")
    messages = [{"role": "system", "content": random_text(rng)}] if rng.random() < 0.6 else []
    messages += [{"role": ("user", "assistant")[i % 2], "content": random_text(rng)} for i in range(n)]
    return messages, final


def expected_refusal(messages: list, final: str):
    """(index, what the message must say) for the first break of [system], user, assistant, ..., final."""
    if not messages:
        return None, "messages is empty; expected [system], user, assistant"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return i, "expected {'role': ..., 'content': str}"
    start = 1 if messages and messages[0].get("role") == "system" else 0
    for i in range(start, len(messages)):
        expected = ("user", "assistant")[(i - start) % 2]
        if messages[i].get("role") != expected:
            return i, f"expected role {expected!r}"
    if len(messages) == start or messages[-1]["role"] != final:
        return len(messages) - 1, f"must end with {'an' if final == 'assistant' else 'a'} {final} turn"
    return None


def break_conversation(rng: random.Random, messages: list, final: str) -> list:
    """One of the mistakes a dataset holds, applied to a well-formed conversation."""
    m = [dict(x) for x in messages]
    body = 1 if m and m[0]["role"] == "system" else 0
    kind = rng.choice(["two users", "assistant first", "system later", "unknown role", "no content",
                       "content not text", "drop final", "extra final", "system only", "empty"])
    if kind == "two users" and len(m) > body + 1:
        m.insert(body + 1, {"role": "user", "content": random_text(rng)})
    elif kind == "assistant first":
        m.insert(body, {"role": "assistant", "content": random_text(rng)})
    elif kind == "system later":
        m.insert(rng.randint(body + 1, len(m)), {"role": "system", "content": random_text(rng)})
    elif kind == "unknown role":
        rng.choice(m[body:])["role"] = rng.choice(["tool", "Assistant", "", None])
    elif kind == "no content":
        rng.choice(m).pop("content")
    elif kind == "content not text":
        rng.choice(m)["content"] = rng.choice([None, 3, ["a"], {"text": "a"}])
    elif kind == "drop final":
        m.pop()
    elif kind == "extra final":
        m.append({"role": final, "content": random_text(rng)})
    elif kind == "system only":
        m = [{"role": "system", "content": random_text(rng)}]
    else:
        m = []
    return m


def draws():
    rng = random.Random(SEED)
    return [random_conversation(rng) for _ in range(DRAWS)]


# --- references -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf(tok_dir):
    import transformers
    import google.protobuf  # noqa: F401
    return transformers.LlamaTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def text_encoder(hf):
    """transformers' own tokenization of text found between two special tokens, reading special-token
    text as text: its backend with prepend_scheme "never" (a chunk after a special token gets no
    "▁", as in hf(whole text)) and encode_special_tokens (split_special_tokens=True)."""
    from tokenizers import Tokenizer, pre_tokenizers
    backend = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    backend.encode_special_tokens = True
    return lambda text: backend.encode(text, add_special_tokens=False).ids if text else []


@pytest.fixture(scope="module")
def sp(tok_dir):
    return spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))


CHAT_TOKEN = re.compile(r"<\|im_(?:start|end)\|>")


def chatml_reference_ids(hf, text_encoder, messages, default_system, generation_prompt):
    """The Jinja text tokenized with only the template's own chat tokens as tokens. Where those are
    is read from the same template rendered with the messages' "<|im_" spelled "<|IM_" (same length)."""
    def render(msgs):
        return hf.apply_chat_template(msgs, chat_template=CHATML_GEN, tokenize=False, default_system=default_system,
                                      add_generation_prompt=generation_prompt)
    text = render(messages)
    masked = render([{**m, "content": m["content"].replace("<|im_", "<|IM_")} for m in messages])
    ids, at = [], 0
    for match in CHAT_TOKEN.finditer(masked):
        ids += text_encoder(text[at:match.start()]) + [hf.convert_tokens_to_ids(match.group())]
        at = match.end()
    return text, ids + text_encoder(text[at:])


def turn_reference(sp, messages, prompt_text, turn_text, bos_each_turn):
    """(ids, supervised mask) of a SentencePiece format: each turn is sp.encode(turn_text(user, reply)),
    then eos; supervised is what that encoding holds past sp.encode(prompt_text(user)), and eos."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    body = messages[1:] if system is not None else messages
    ids, mask = [], []
    for k in range(0, len(body), 2):
        user = body[k]["content"]
        if k == 0 and system is not None:
            user = (system, user)
        bos = [sp.bos_id()] if bos_each_turn or k == 0 else []
        prompt = sp.encode(prompt_text(user))
        if k + 1 == len(body):  # the generation prompt
            ids, mask = ids + bos + prompt, mask + [0] * (len(bos) + len(prompt))
            break
        turn = sp.encode(turn_text(user, body[k + 1]["content"]))
        assert turn[:len(prompt)] == prompt, "the reply's text merged with the prompt's: no split point"
        ids += bos + turn + [sp.eos_id()]
        mask += [0] * (len(bos) + len(prompt)) + [1] * (len(turn) - len(prompt) + 1)
    return ids, mask


def llama2_prompt(user):
    if isinstance(user, tuple):
        user = f"<<SYS>>\n{user[0]}\n<</SYS>>\n\n{user[1]}"
    return f"[INST] {user.strip()} [/INST]"


def llama2_turn(user, reply):
    return f"{llama2_prompt(user)} {reply.strip()} "


def plain_prompt(user):
    head, user = (f"{user[0]}\n\n", user[1]) if isinstance(user, tuple) else ("", user)
    return f"{head}User: {user}\nAssistant:"


def plain_turn(user, reply):
    # The documented reply is enc("{reply}"), whose dummy "▁" is the space after "Assistant:": an
    # empty reply has none, so the model learns </s> right after "Assistant:" (the prompt's end).
    return f"{plain_prompt(user)} {reply}" if reply else plain_prompt(user)


# --- the fuzz -------------------------------------------------------------------------------
def check_render(template, messages, tok, ids, mask=None):
    """render's ids, labels in every mode (against a 0/1 mask of supervised tokens, if given), and
    render_prompt(messages[:-1]) as the prefix the final reply was trained after."""
    rendered = template.render(messages, tok)
    labels = rendered.labels
    assert rendered.input_ids == ids
    if mask is not None:
        assert [int(label != IGNORE_INDEX) for label in labels] == mask
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    assert supervised_runs(template.render(messages, tok, mode="last").labels) == supervised_runs(labels)[-1:]
    assert template.render(messages, tok, mode="all").labels == ids
    prompt = template.render_prompt(messages[:-1], tok)
    assert ids[:len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE_INDEX != labels[len(prompt)]


@pytest.mark.parametrize("default_system", DEFAULT_SYSTEMS)
def test_chatml_against_transformers(tok, hf, text_encoder, default_system):
    template = ChatML(default_system=default_system)
    special = set(hf.get_added_vocab())
    compared = 0
    for messages, final in draws():
        generation_prompt = final == "user"
        text, ref_ids = chatml_reference_ids(hf, text_encoder, messages, default_system, generation_prompt)
        if default_system == QWEN_DEFAULT:  # the generation-marked template is Qwen2's, text for text
            assert text == hf.apply_chat_template(messages, chat_template=QWEN2_JINJA, tokenize=False,
                                                  add_generation_prompt=generation_prompt)
        ids = template.render_prompt(messages, tok) if generation_prompt else template.render(messages, tok).input_ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert ids == ref_ids, (messages, final)
        if not any(s in m["content"] for m in messages for s in special):
            # no special-token text in a message: transformers' plain tokenization is the reference too
            out = hf.apply_chat_template(messages, chat_template=CHATML_GEN, tokenize=True, return_dict=True,
                                         return_assistant_tokens_mask=not generation_prompt,
                                         default_system=default_system, add_generation_prompt=generation_prompt)
            assert out["input_ids"] == ids
            compared += 1
            if not generation_prompt:
                check_render(template, messages, tok, ids, out["assistant_masks"])
        elif not generation_prompt:
            # transformers' mask would follow its own ids, which read the markup as tokens: here the
            # supervised runs are each reply's text, tokenized as text, then the template's <|im_end|>
            end = tok.token_to_id("<|im_end|>")
            replies = [text_encoder(m["content"]) + [end] for m in messages if m["role"] == "assistant"]
            assert supervised_runs(template.render(messages, tok).labels) == replies
            check_render(template, messages, tok, ids)
    assert DRAWS // 2 < compared < DRAWS - DRAWS // 5  # both kinds are drawn often


@pytest.mark.parametrize("name", ["llama2", "plain"])
def test_sentencepiece_formats_against_reference(tok, sp, name):
    template = get_template(name)
    prompt_text, turn_text = (llama2_prompt, llama2_turn) if name == "llama2" else (plain_prompt, plain_turn)
    for messages, final in draws():
        ids, mask = turn_reference(sp, messages, prompt_text, turn_text, bos_each_turn=name == "llama2")
        if name == "llama2":
            assert ids == meta_llama2_dialog_tokens(sp, messages)
        if final == "user":
            assert template.render_prompt(messages, tok) == ids
        else:
            check_render(template, messages, tok, ids, mask)


@pytest.mark.parametrize("name", ["chatml", "llama2", "plain"])
def test_broken_conversations_are_refused_naming_the_message(tok, name):
    template = get_template(name)
    rng = random.Random(SEED + 1)
    for messages, final in draws():
        broken = break_conversation(rng, messages, final)
        refusal = expected_refusal(broken, final)
        if refusal is None:  # the mistake happened to leave a well-formed conversation
            continue
        index, expected = refusal
        with pytest.raises(ValueError) as e:
            (template.render_prompt if final == "user" else template.render)(broken, tok)
        message = str(e.value)
        if index is not None:
            assert f"messages[{index}]" in message, (broken, message)
        assert expected in message, (broken, message)


@pytest.mark.parametrize("messages, final, match", [
    ([{"role": "user", "content": "u"}], "assistant",
     r"messages\[0\]: a conversation must end with an assistant turn; this conversation ends with a 'user' turn"),
    ([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "user",
     r"messages\[1\]: a conversation must end with a user turn; this conversation ends with an 'assistant' turn"),
    ([{"role": "system", "content": "s"}], "user",
     r"messages\[0\]: a conversation must end with a user turn; this conversation holds no turn after the system"),
])
def test_a_wrong_final_turn_is_named(tok, messages, final, match):
    """The refusal of a wrong final turn named no message (the fuzz above found it): it names the last."""
    template = ChatML()
    with pytest.raises(ValueError, match=match):
        (template.render_prompt if final == "user" else template.render)(messages, tok)
