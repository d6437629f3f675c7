"""`glm-serve chat`: a terminal chat with multi-turn history, streaming the answer as it is generated, either
against a running server (OpenAI-compatible /v1, over httpx) or in-process on a checkpoint (`--model`).

A line that is one word starting with "/" is a command: /reset (forget the conversation), /exit (or Ctrl-D, or
Ctrl-C at the prompt); an unknown one is said so, not sent.
A failed turn (the server's error, a server gone away, a conversation longer than the context) is reported and
forgotten; the chat goes on."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator

from glm_serve.sse_lines import iter_sse_lines

KEY_ENV = "GLM_SERVE_API_KEY"


def add_chat_parser(sub, add_model_args) -> None:
    c = sub.add_parser("chat", help="chat in the terminal, against a running server or an in-process model")
    add_model_args(c)
    c.set_defaults(model=None)  # no --model: talk to the server at --url
    c.add_argument("--url", default="http://127.0.0.1:8000", help="server to talk to when --model is not given")
    c.add_argument("--served-model", default=None, help="model name to ask the server for (default: its first)")
    c.add_argument("--api-key", default=None, help=f"the server's api key (default: ${KEY_ENV})")
    c.add_argument("--system", default=None, help="a system message opening the conversation")
    c.add_argument("--temperature", type=float, default=None, help="default: the checkpoint's")
    c.add_argument("--max-tokens", type=int, default=512)
    c.add_argument("--kv-cache-tokens", type=int, default=None, help="in-process: KV-cache capacity in tokens")
    c.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                   help="in-process: auto (the model's dtype) or fp8 (e4m3 with a scale per token and KV head, "
                        "twice bf16's tokens in the same memory; see `glm-serve serve --help`)")
    c.set_defaults(fn=cmd_chat)


Backend = Callable[[list[dict]], Iterator[str]]  # the conversation so far -> the answer's text pieces


def server_backend(url: str, model: str | None, api_key: str | None, temperature: float | None,
                   max_tokens: int, timeout: float = 600.0) -> Backend:
    import httpx  # noqa: PLC0415

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
    if model is None:  # before the first prompt: a server that cannot be used is a one-line error (ValueError)
        try:
            r = client.get("/v1/models")
        except httpx.HTTPError as e:
            raise ValueError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
        try:
            _raise_for(r)
        except RuntimeError as e:
            raise ValueError(f"{url}/v1/models: {e}") from None
        try:
            model = r.json()["data"][0]["id"]
        except (ValueError, LookupError, TypeError):  # a web page, or an API with no model loaded (yet)
            raise ValueError(f"{url}/v1/models lists no model (an OpenAI-compatible server there?); name the model "
                             "with --served-model") from None

    def send(messages: list[dict]) -> Iterator[str]:
        try:
            yield from _stream(messages)
        except httpx.HTTPError as e:  # the server went away mid-conversation: this turn fails, the chat goes on
            raise RuntimeError(f"cannot reach {url}: {type(e).__name__}: {e}") from None

    def _stream(messages: list[dict]) -> Iterator[str]:
        body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens}
        if temperature is not None:
            body["temperature"] = temperature
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                _raise_for(r)
            for line in iter_sse_lines(r.iter_bytes()):
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(chunk["error"].get("message", "the server failed"))
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        yield delta["content"]
                    for call in delta.get("tool_calls") or []:
                        fn = call.get("function") or {}
                        yield (f"[tool call] {fn['name']}(" if fn.get("name") else "") + (fn.get("arguments") or "")

    return send


def _raise_for(r) -> None:
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        raise RuntimeError(f"server answered {r.status_code}: {message}")


def local_backend(args) -> Backend:
    from glm_serve.api.context import GenerationDefaults  # noqa: PLC0415
    from glm_serve.api.parser import ChoiceParser  # noqa: PLC0415
    from glm_serve.chat import encode_chat  # noqa: PLC0415
    from glm_serve.engine.config import EngineConfig  # noqa: PLC0415
    from glm_serve.engine.engine import LLMEngine  # noqa: PLC0415
    from glm_serve.sampling_params import SamplingParams  # noqa: PLC0415

    engine = LLMEngine(EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, rope_theta=args.rope_theta,
        quantization=None if args.quantization in (None, "none") else args.quantization,
        kv_cache_tokens=args.kv_cache_tokens, kv_cache_dtype=args.kv_cache_dtype))
    defaults = GenerationDefaults.from_checkpoint(engine.model_path)  # the server's defaults, here too
    temperature = args.temperature
    if temperature is None:
        temperature = (defaults.temperature if defaults.temperature is not None else 1.0) if defaults.do_sample else 0
    params = SamplingParams(temperature=temperature, top_p=defaults.top_p if defaults.top_p else 1.0,
                            max_tokens=args.max_tokens)
    turn = [0]

    def send(messages: list[dict]) -> Iterator[str]:
        ids = encode_chat(engine.tokenizer, messages, chat_template=engine.tokenizer.chat_template)
        rid = f"chat-{turn[0]}"
        turn[0] += 1
        try:
            engine.add_request(rid, ids, params)
        except ValueError as e:  # e.g. the conversation outgrew the context window: this turn fails, not the chat
            raise RuntimeError(str(e)) from None
        parser = ChoiceParser()  # drops the answer's leading "\n"
        try:
            while engine.has_unfinished():
                for out in engine.step():
                    for o in out.outputs:
                        pieces = parser.feed(o.text) + (parser.finish() if o.finish_reason else [])
                        for d in pieces:
                            if d.content:
                                yield d.content
        finally:
            engine.abort_request(rid)  # Ctrl-C mid-answer: free its blocks

    return send


def chat_loop(send: Backend, read: Callable[[str], str], write: Callable[[str], None],
              system: str | None = None) -> list[dict]:
    """Read a line, send the whole conversation, stream the answer, remember it; until /exit or EOF.
    Returns the conversation."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: quit quietly
            write("\n")
            return history
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return history
        if text == "/reset":
            history = history[:1] if system else []
            write("(conversation cleared)\n")
            continue
        if text.startswith("/") and len(text.split()) == 1:  # a lone /word is a command, never a message
            write(f"unknown command {text}; the commands are /reset and /exit\n")
            continue
        history.append({"role": "user", "content": line})
        write("glm> ")
        answer = []
        try:
            for piece in send(history):
                answer.append(piece)
                write(piece)
        except KeyboardInterrupt:
            write(" [interrupted]")
        except RuntimeError as e:
            write(f"[error] {e}\n")
            history.pop()
            continue
        write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})


def cmd_chat(args) -> int:
    import logging  # noqa: PLC0415

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would garble the chat
    if args.max_tokens < 1:  # in-process, 0 answered every turn with nothing; a server refused every turn
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.temperature is not None and args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.model is not None:
        send = local_backend(args)
        where = f"in-process model {args.model}"
    else:
        send = server_backend(args.url, args.served_model, args.api_key or os.environ.get(KEY_ENV),
                              args.temperature, args.max_tokens)
        where = args.url
    if args.model == "demo":
        print("(the demo model has random weights: its text is noise)", file=sys.stderr)
    print(f"chatting with {where}; /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)

    def write(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    chat_loop(send, input, write, args.system)
    return 0
