"""`LLM`: offline generation in-process. Prompts (strings, token id lists, or chat conversations) go into
the engine all at once; results come back in input order, with a progress bar.

    llm = LLM(model="THUDM/glm-4-9b-chat-hf")
    results = llm.generate([[{"role": "user", "content": "你好"}]], SamplingParams(temperature=0, max_tokens=64))
"""

from __future__ import annotations

from dataclasses import dataclass, field

from glm_serve.engine.config import EngineConfig
from glm_serve.engine.engine import LLMEngine
from glm_serve.engine.outputs import TokenLogprob, merge_outputs
from glm_serve.sampling_params import SamplingParams

Prompt = str | list[int] | list[dict]  # raw text | token ids | a conversation (list of messages)


@dataclass
class Choice:
    index: int
    text: str  # the generated text (for conversations: the raw text, tool call syntax included)
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    content: str | None = None  # conversations: the parsed answer (leading "\n" separator removed)
    tool_calls: list = field(default_factory=list)  # conversations: parsed tool calls
    error: str | None = None


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    choices: list[Choice]
    usage: dict  # prompt_tokens, completion_tokens, cached_tokens
    # [len(prompt_token_ids)] with SamplingParams.prompt_logprobs: each prompt token's logprob (the first None)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids


class LLM:
    def __init__(self, model: str = "demo", **engine_kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._n = 0
        self._factory = None  # ConstraintFactory, for guided generation

    def _constraint_factory(self):
        """Built on the first guided call (xgrammar scans the vocabulary once), kept for the next ones."""
        if self._factory is None:
            from glm_serve.constrain import ConstraintFactory  # noqa: PLC0415 (xgrammar: optional)

            self._factory = ConstraintFactory(self.tokenizer, self.engine.model_config.vocab_size)
        return self._factory

    def encode(self, prompt: Prompt, tools: list | None = None) -> tuple[list[int], bytes | None]:
        """Prompt -> (token ids, image bytes or None). Conversations may carry one image (GLM-4V) as an
        `image_url` part: bare base64 or a data URL (no downloads offline)."""
        from glm_serve.chat import encode_chat, image_urls  # noqa: PLC0415

        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt), None
        if prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt), None
        if prompt and all(isinstance(m, dict) for m in prompt):
            urls = image_urls(prompt)
            if len(urls) > 1:
                raise ValueError(f"{len(urls)} images in one conversation: GLM-4V takes exactly one")
            image = None
            if urls:
                from glm_serve.image import parse_image_url  # noqa: PLC0415

                image = parse_image_url(urls[0], allow_http=False)
            ids = encode_chat(self.tokenizer, prompt, tools=tools, chat_template=self.tokenizer.chat_template,
                              allow_images=bool(urls))
            return ids, image
        raise ValueError("a prompt is a string, a list of token ids, or a list of chat messages")

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 tools: list | None = None, use_tqdm: bool = True, guided: dict | None = None
                 ) -> list[GenerationResult]:
        """guided: hold every answer to one of {"json": a JSON schema}, {"json_object": True}, {"regex": a pattern
        the whole answer matches} or {"choice": [strings]} (as the server's guided decoding; needs xgrammar, the
        `structured` extra). A conversation's answer is held as content; a text or token-id prompt's generated text
        itself."""
        from glm_serve.chat import parse_assistant_output  # noqa: PLC0415

        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        tool_names = frozenset(t["function"]["name"] for t in tools or () if isinstance(t, dict)
                               and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str))
        kind, spec = _guided(guided)
        engine, order, states = self.engine, [], {}
        bar = None
        try:
            for prompt, p in zip(prompts, plist):
                rid = f"offline-{self._n}"
                self._n += 1
                ids, image = self.encode(prompt, tools)
                is_chat = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
                constraints = None
                if kind is not None:
                    factory = self._constraint_factory()
                    constraints = [factory.guided(kind, spec, content=is_chat) for _ in range(p.n)]
                engine.add_request(rid, ids, p, constraints, image=image, final_only=True)
                states[rid] = (ids, is_chat, [])  # last: the request's outputs, merged once at the end
                order.append(rid)
            bar = _progress(len(order), use_tqdm)
            while engine.has_unfinished():
                for out in engine.step():
                    states[out.request_id][2].append(out)
                    if out.finished and bar is not None:
                        bar.update(1)
        except BaseException:
            # A prompt that fails to encode or validate (or an interrupt): drop what this call queued, so the
            # engine is left empty for the next call instead of holding requests nobody collects.
            for rid in order:
                engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        results = []
        for rid in order:
            ids, is_chat, outs = states[rid]
            total = merge_outputs(outs)
            choices = [Choice(o.index, o.text, o.token_ids, o.finish_reason, o.logprobs, error=o.error)
                       for o in total.outputs]
            if is_chat:
                for ch in choices:  # like the API: only calls of the request's own functions are calls
                    parsed = parse_assistant_output(ch.text, tool_names)
                    ch.content, ch.tool_calls = parsed.content, parsed.tool_calls
            usage = {"prompt_tokens": total.prompt_tokens, "completion_tokens": total.completion_tokens,
                     "cached_tokens": total.cached_tokens}
            results.append(GenerationResult(rid, ids, choices, usage, total.prompt_logprobs))
        return results


def _guided(guided: dict | None) -> tuple[str | None, object]:
    """LLM.generate's `guided` -> (ConstraintFactory.guided's kind, spec); (None, None) for none."""
    from glm_serve.schema_rules import GUIDED_KEYS, guided_spec  # noqa: PLC0415

    if not guided:
        return None, None
    if not isinstance(guided, dict) or len(guided) != 1 or next(iter(guided)) not in GUIDED_KEYS:
        raise ValueError(f"guided must be one of {{'json': schema}}, {{'json_object': True}}, {{'regex': pattern}} or "
                         f"{{'choice': [strings]}}, got {guided!r}")
    (key, value), = guided.items()
    try:
        return guided_spec(key, value)
    except ValueError as e:
        raise ValueError(f"guided {key}: {e}") from None


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc="generate", unit="req", dynamic_ncols=True)
