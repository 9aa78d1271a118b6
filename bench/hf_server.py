"""The naive baseline: a minimal OpenAI-compatible server around transformers' GPT-2.

One request at a time (an asyncio.Lock), token by token with past_key_values, streamed
as SSE from /v1/completions and /v1/chat/completions. What serving without batching or
a paged cache costs; bench/compare.py measures it beside gptserve and llama.cpp.

    python bench/hf_server.py --model FOLDER --port 8001 --threads 2
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import GPT2LMHeadModel, GPT2TokenizerFast


class Generator:
    def __init__(self, folder: str):
        self.tokenizer = GPT2TokenizerFast.from_pretrained(folder)
        self.model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
        self.eos = self.tokenizer.eos_token_id
        self.lock = asyncio.Lock()

    @torch.inference_mode()
    def step(self, ids: list[int], past, temperature: float) -> tuple[int, object]:
        out = self.model(torch.tensor([ids]), past_key_values=past, use_cache=True)
        logits = out.logits[0, -1]
        if temperature > 0:
            token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1))
        else:
            token = int(logits.argmax())
        return token, out.past_key_values

    async def stream(self, prompt_ids: list[int], max_tokens: int, temperature: float, ignore_eos: bool):
        """Yields (new text, finish_reason or None) per token; holds back split UTF-8."""
        async with self.lock:
            ids, past, out, sent = prompt_ids, None, [], ""
            for i in range(max_tokens):
                token, past = await asyncio.to_thread(self.step, ids, past, temperature)
                if token == self.eos and not ignore_eos:
                    yield "", "stop"
                    return
                out.append(token)
                ids = [token]
                text = self.tokenizer.decode(out)
                delta = "" if text.endswith("\ufffd") else text[len(sent):]
                sent += delta
                yield delta, "length" if i == max_tokens - 1 else None


def chat_prompt(messages: list[dict]) -> str:
    return "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages) + "assistant:"


def build_app(gen: Generator, model_name: str, context: int) -> FastAPI:
    app = FastAPI()

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                       "param": None, "code": None}}, status_code=status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "bench"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    async def respond(body: dict, chat: bool):
        if chat:
            prompt_ids = gen.tokenizer.encode(chat_prompt(body.get("messages") or []))
        else:
            prompt = body.get("prompt", "")
            prompt_ids = prompt if isinstance(prompt, list) else gen.tokenizer.encode(prompt)
        max_tokens = int(body.get("max_tokens") or 16)
        if not prompt_ids or len(prompt_ids) + max_tokens > context:
            return error(f"prompt ({len(prompt_ids)}) + max_tokens ({max_tokens}) must be in 1..{context}")
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        tokens = gen.stream(prompt_ids, max_tokens, temperature, bool(body.get("ignore_eos")))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        def choice(text: str, finish: str | None) -> dict:
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        if not body.get("stream"):
            text, n, finish = "", 0, None
            async for delta, finish in tokens:
                text, n = text + delta, n + (finish != "stop")
            ch = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish} \
                if chat else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [ch],
                    "usage": usage(n)}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def sse():
            n = 0
            obj = kind + (".chunk" if chat else "")
            async for delta, finish in tokens:
                n += finish != "stop"
                chunk = {"id": rid, "object": obj, "created": created, "model": model_name,
                         "choices": [choice(delta, finish)]}
                yield f"data: {json.dumps(chunk)}\n\n"
            if include_usage:
                chunk = {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [],
                         "usage": usage(n)}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(await request.json(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(await request.json(), chat=True)

    return app


def main() -> None:
    p = argparse.ArgumentParser(description="naive transformers GPT-2 server (one request at a time)")
    p.add_argument("--model", required=True, help="Hugging Face GPT-2 folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--served-model-name", default="hf-gpt2")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = Generator(args.model)
    context = gen.model.config.n_positions
    uvicorn.run(build_app(gen, args.served_model_name, context), host=args.host, port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
