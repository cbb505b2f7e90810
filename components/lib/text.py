"""Text the models read: the BOS/EOS convention, chat rendering, prompt/completion rows and their tokens.

**The convention** (training, generation, scoring and lm-evaluation-harness agree on it):
- A document in a token file is its tokens followed by EOS. llmcycle's tokenizers declare the same token,
  `</s>`, as BOS and EOS (GPT-2 does the same), so every document after the first is read after the token
  that `start_token` returns.
- Prompts, completions and contexts are encoded without special tokens (`add_special_tokens=False`), as
  lm-eval's HFLM does by default; a completion the model is trained on ends with EOS.
- A sequence that would otherwise have no context (an empty prompt, scoring a document from its first
  token) starts from `start_token`: the BOS, else the EOS (lm-eval's `prefix_token_id`).

**Chat rows** are rendered with the tokenizer's chat template when it has one, else as plain turns
(`Human: ...`, `Assistant: ...`, `System: ...`, separated by blank lines; the prompt ends `Assistant:`), the
format Constitutional AI's transcripts use too.
"""

from __future__ import annotations

ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}


def start_token(tokenizer) -> int:
    """The token a sequence without context starts from: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def pad_token(tokenizer) -> int:
    """The padding id (EOS where the tokenizer has no pad; attention masks, not ids, decide what counts)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text, without special tokens (see the convention above)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Chat messages as text: the tokenizer's chat template, or plain `Human:`/`Assistant:` turns."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(f"{ROLES.get(m['role'], m['role'].title())}: {m['content']}\n\n" for m in messages)
    return text + ("Assistant:" if add_generation_prompt else "")


def split_chat(tokenizer, messages: list[dict], where: str = "row") -> tuple[str, str]:
    """(prompt, completion) of a chat whose last message is the assistant's reply (the completion)."""
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        role = messages[-1].get("role") if messages and isinstance(messages[-1], dict) else None
        raise ValueError(f"{where}: the last message must be the assistant's (the completion), got role {role!r}")
    prompt = render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
    full = render_chat(tokenizer, messages)
    if not full.startswith(prompt):  # a template that renders the history differently once it is answered
        return prompt, " " + messages[-1]["content"]
    completion = full[len(prompt):]
    return prompt, completion if getattr(tokenizer, "chat_template", None) else completion.rstrip("\n")


def prompt_completion(row: dict, tokenizer) -> tuple[str, str]:
    """(prompt, completion) of a row in either TRL format: `{prompt, completion}` or `{messages: [...]}`."""
    where = row.get("_where", "row")
    if "prompt" in row and "completion" in row:
        return str(row["prompt"]), str(row["completion"])
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected {{prompt, completion}} or {{messages: [...]}}, got fields "
                         f"{', '.join(k for k in row if k != '_where') or 'none'}")
    return split_chat(tokenizer, messages, where)


def user_prompt(tokenizer, text: str) -> str:
    """A single user turn, ready for the model's reply."""
    return render_chat(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)


def truncate_pair(prompt: list[int], reply: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit prompt + reply into max_length: the reply keeps at least half (cut from its end), the prompt is cut
    from its start (its end, next to the reply, matters most)."""
    reply = reply[:max_length - min(len(prompt), max_length // 2)]
    if len(prompt) + len(reply) > max_length:
        prompt = prompt[len(prompt) + len(reply) - max_length:]
    return prompt, reply


def encode_completion(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids ending with EOS), cut to `max_length` together (`truncate_pair`)."""
    reply = encode(tokenizer, completion)
    if tokenizer.eos_token_id is not None and (not reply or reply[-1] != tokenizer.eos_token_id):
        reply = reply + [tokenizer.eos_token_id]
    return truncate_pair(encode(tokenizer, prompt), reply, max_length)
