"""What llm-serve's chat endpoint adds for applications (llm.apps), in one place:

  guardrails   --policy FILE: a refused conversation is HTTP 400 with code "content_policy";
               output that the policy filters (redactions, withheld text, a call to a tool the
               request did not offer) ends with finish_reason "content_filter"
  grounding    --rag-index INDEX: the last user message of a request without tools (a request
               with tools is the model's and its tools' to answer) is answered from the index's sources
               (llm.apps.grounding: the rules in the system message, numbered sources in the
               user's); the sources used come back in the response's extra field "sources"
               (source, start, end, score, relevance per source), [] when nothing was relevant
               enough (then the answer is "I don't know" and the model is not asked)
  tools        OpenAI's "tools": the model's <call>NAME {...}</call> (llm.tool_calls) becomes
               the message's "tool_calls" with finish_reason "tool_calls" when NAME is one of
               the request's tools and the arguments match its schema; the client runs it and
               sends the result back as a "tool" message, which the model reads as <result>
  log          --app-log FILE: one JSON line per chat answer (llm.apps.app_log): template,
               sources and scores, tool calls, guardrail decisions, latency; content only
               with --app-log-content

A stream with any of these active is generated whole, checked, then sent as chunks: nothing
unchecked reaches the client. /v1/completions has none of them, so a server with a policy
refuses it (403, code "content_policy"): raw prompts and texts would pass the policy unchecked.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from llm.apps.app_log import AppLog
from llm.apps.grounding import NOT_FOUND, RULES, ground
from llm.apps.guardrails import Guardrails, Intervention, PolicyViolation
from llm.apps.index import DEFAULT_MIN_RELEVANCE, Hit, RetrievalIndex
from llm.apps.tools import Tool, check_arguments
from llm.chat_template import ChatTemplate, Message
from llm.serving.schemas import ApiError, ChatCompletionRequest
from llm.tool_calls import CALL_END, CALL_START, format_tool_call, format_tool_result, parse_tool_call


@dataclass
class ChatPlan:
    """One chat request, prepared: the prompt, and what its answer is checked against."""

    prompt_ids: list[int]
    tools: dict[str, Tool] = field(default_factory=dict)
    sources: list[Hit] | None = None  # None: not a grounded request
    answer: str | None = None  # set: answer this without the model (nothing relevant in the index)
    interventions: list[Intervention] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


def request_tools(body: ChatCompletionRequest) -> dict[str, Tool]:
    """The request's tools (name -> Tool, without a function: the client runs them)."""
    if body.tool_choice == "none":
        return {}
    return {t.function.name: Tool(t.function.name, t.function.description or "",
                                  t.function.parameters or {"type": "object", "properties": {}}, None)
            for t in body.tools or []}  # fmt: skip


def conversation(body: ChatCompletionRequest) -> tuple[list[Message], str]:
    """(messages for the chat template, text the assistant's unfinished reply already holds).
    A tool exchange is part of the assistant's turn, as the model was trained: its calls and,
    after them, the results the client sent as "tool" messages."""
    messages, pending = [], ""
    for m in body.messages:
        if m.role == "assistant" and m.tool_calls:
            pending += m.text() + "".join(format_tool_call(c.function.name, _arguments(c.function.arguments))
                                          for c in m.tool_calls)  # fmt: skip
        elif m.role == "tool":
            pending += format_tool_result(m.text())
        else:
            if pending:  # a finished exchange: fold it into the assistant turn it belongs to
                if m.role == "assistant":
                    messages.append(Message("assistant", pending + m.text()))
                    pending = ""
                    continue
                messages.append(Message("assistant", pending))
                pending = ""
            messages.append(Message("system" if m.role == "developer" else m.role, m.text()))
    return messages, pending


def _arguments(text: str) -> dict:
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError:
        raise ApiError(400, f"tool_calls: arguments must be a JSON object, got {text[:80]!r}", param="messages") from None
    if not isinstance(arguments, dict):
        raise ApiError(400, "tool_calls: arguments must be a JSON object", param="messages")
    return arguments


def tools_system_text(tools: dict[str, Tool]) -> str:
    lines = [f"- {t.name}: {t.description} Arguments: {json.dumps(t.parameters.get('properties', {}))}"
             for t in tools.values()]  # fmt: skip
    return f"Tools: call one as {CALL_START}NAME {{JSON arguments}}{CALL_END}.\n" + "\n".join(lines)


class ChatApplications:
    def __init__(self, guardrails: Guardrails | None = None, index: RetrievalIndex | None = None,
                 log: AppLog | None = None, top_k: int = 3, min_relevance: float | None = None):  # fmt: skip
        self.guardrails, self.index, self.log = guardrails, index, log or AppLog()
        self.top_k, self.min_relevance = top_k, min_relevance

    def active(self, body: ChatCompletionRequest) -> bool:
        return bool(self.guardrails or self.index or body.tools)

    def plan(self, body: ChatCompletionRequest, template: ChatTemplate, tokenizer, context: int,
             max_tokens: int | None) -> ChatPlan:  # fmt: skip
        """The prompt ids for the request, after the input checks, grounding and tools."""
        messages, continuation = conversation(body)
        tools = request_tools(body)
        plan = ChatPlan([], tools)
        if self.guardrails:
            try:
                self.guardrails.check_input("\n".join(m.content for m in messages if m.role == "user"))
            except PolicyViolation as refusal:
                self.log.write({"event": "refused", "command": "llm-serve", "guardrails": [refusal.intervention.to_dict()]})
                raise ApiError(400, str(refusal), param="messages", code="content_policy") from None
        system = [m.content for m in messages[:1] if m.role == "system"]
        rest = messages[1:] if system else messages
        if tools:
            system.append(tools_system_text(tools))
        if self.index is not None and not tools and rest and rest[-1].role == "user":
            try:
                plan.sources, rest = self._ground(plan, template, tokenizer, context, max_tokens, system, rest)
            except ValueError as error:  # the question alone leaves no room in the context
                raise ApiError(400, str(error), param="messages", code="context_length_exceeded") from None
        system_message = [Message("system", "\n\n".join(system))] if system else []
        try:
            plan.prompt_ids = template.prompt_ids(system_message + rest, tokenizer) + tokenizer.encode_ordinary(continuation)
        except ValueError as error:
            raise ApiError(400, str(error), param="messages") from None
        return plan

    def _ground(self, plan, template, tokenizer, context, max_tokens, system, rest):
        question = rest[-1].content
        retriever = self.index.resolve_retriever("auto")
        threshold = DEFAULT_MIN_RELEVANCE[retriever] if self.min_relevance is None else self.min_relevance
        hits = self.index.search(question, self.top_k, retriever)
        if self.guardrails:
            hits, dropped = self.guardrails.screen_sources(hits)
            plan.interventions += dropped
        relevant = [h for h in hits if h.relevance >= threshold]
        if not relevant:
            plan.answer = NOT_FOUND
            return [], rest

        def render(rules: str, user: str) -> list[int]:
            return template.prompt_ids([Message("system", "\n\n".join(system + [rules]))] + rest[:-1]
                                       + [Message("user", user)], tokenizer)  # fmt: skip

        budget = context - (max_tokens or min(64, context // 2))
        grounded = ground(question, relevant, render, len, budget)
        system.append(RULES)
        return grounded.hits, rest[:-1] + [Message("user", grounded.user)]

    def finish(self, response: dict, plan: ChatPlan, template: ChatTemplate) -> dict:
        """The response's choices checked: tool calls, output filtering; sources added; logged."""
        for choice in response["choices"]:
            message = choice["message"]
            text, finish_reason, interventions = message["content"], choice["finish_reason"], list(plan.interventions)
            start = text.find(CALL_START)
            if start >= 0 and plan.tools:
                call, text = text[start:].split(CALL_END)[0] + CALL_END, text[:start]
                tool_call, refused = self._tool_call(call, plan.tools)
                if tool_call:
                    message["tool_calls"], finish_reason = [tool_call], "tool_calls"
                else:
                    interventions.append(refused)
                    finish_reason = "content_filter"
            if self.guardrails:
                text, filtered = self.guardrails.filter_output(text)
                if filtered:
                    interventions += filtered
                    finish_reason = "content_filter"
            message["content"] = text or (None if message.get("tool_calls") else text)
            choice["finish_reason"] = finish_reason
            self.log.write({
                "event": "chat_answer", "command": "llm-serve", "template": template.name,
                "sources": [dict(h.summary(), text=h.chunk.text) for h in plan.sources or []],
                "tool_calls": [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                               for c in message.get("tool_calls", [])],
                "guardrails": [i.to_dict() for i in interventions], "finish_reason": finish_reason,
                "latency_ms": round(1000 * (time.perf_counter() - plan.started), 1), "answer": text,
            })  # fmt: skip
        if plan.sources is not None:
            response["sources"] = [h.summary() for h in plan.sources]
        return response

    def _tool_call(self, call: str, tools: dict[str, Tool]) -> tuple[dict | None, Intervention | None]:
        try:
            name, arguments = parse_tool_call(call)
            if name not in tools:
                raise ValueError(f"tool {name!r} is not among the request's tools ({', '.join(tools)})")
            check_arguments(tools[name], arguments)
        except ValueError as error:
            return None, Intervention("tool_whitelist", "withheld", str(error))
        return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)}}, None  # fmt: skip

    def direct_response(self, plan: ChatPlan, model: str, template: ChatTemplate) -> dict:
        """The response when the answer needs no model (nothing relevant in the index)."""
        response = {"id": "chatcmpl-" + uuid.uuid4().hex, "object": "chat.completion", "created": int(time.time()),
                    "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": plan.answer},
                                                 "logprobs": None, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}  # fmt: skip
        return self.finish(response, plan, template)


def as_stream(response: dict) -> list[str]:
    """A checked, whole response as server-sent events: per choice its role, content (or tool
    calls) and finish chunks, then [DONE]."""
    head = {k: response[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    events = []
    for choice in response["choices"]:
        message = choice["message"]
        delta = {"role": "assistant", "content": message["content"] or ""}
        if message.get("tool_calls"):
            delta["tool_calls"] = [dict(call, index=i) for i, call in enumerate(message["tool_calls"])]
        events.append({**head, "choices": [{"index": choice["index"], "delta": delta, "logprobs": None,
                                            "finish_reason": None}]})  # fmt: skip
        events.append({**head, "choices": [{"index": choice["index"], "delta": {}, "logprobs": None,
                                            "finish_reason": choice["finish_reason"]}]})  # fmt: skip
    if "sources" in response:
        events[-1]["sources"] = response["sources"]
    return [f"data: {json.dumps(event)}\n\n" for event in events] + ["data: [DONE]\n\n"]
