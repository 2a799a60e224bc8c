"""The door in front of the app (an ASGI middleware): every HTTP request gets a RequestRecord
and an x-request-id; /v1/* requests must carry an accepted API key and fit their client's
rate limits; when the response ends, the record goes to the metrics and the request log.

    request --> record (id) --> /v1/*: key? (401) --> requests/min? (429) --> the app
    response <-- x-request-id, x-ratelimit-* headers <--'
    end of response (or disconnect) --> give back unused tokens, metrics, one JSON log line

/health, /metrics and the pages (/, /playground) stay open: a load balancer and a browser
reach them without a key (the pages ask for the key and send it with their API calls).
A plain ASGI middleware rather than Starlette's BaseHTTPMiddleware, so that streaming
responses and disconnect detection pass through untouched.
"""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request

from llm.serving.auth import ApiKeys
from llm.serving.metrics import ServerMetrics
from llm.serving.rate_limits import ClientLimits
from llm.serving.request_log import RequestRecord, log_request
from llm.serving.schemas import ApiError

PROTECTED_PREFIX = "/v1/"


def request_record(request: Request) -> RequestRecord:
    """The record AccessMiddleware made for this request."""
    return request.state.record


class AccessMiddleware:
    def __init__(self, app, keys: ApiKeys, limits: ClientLimits, metrics: ServerMetrics, routes: frozenset[str],
                 log_content: bool = False):
        self.app, self.keys, self.limits, self.metrics = app, keys, limits, metrics
        self.routes, self.log_content = routes, log_content

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        record = RequestRecord(scope["method"], scope["path"], client[0] if client else None)
        record.route = scope["path"] if scope["path"] in self.routes else None
        scope.setdefault("state", {})["record"] = record

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = record.request_id
                if self.limits and scope["path"].startswith(PROTECTED_PREFIX) and record.refusal != "unauthorized":
                    headers.update(self.limits.headers(record.client))
            await send(message)

        try:
            refusal = self._refusal(scope, record)
            if refusal is not None:
                await refusal.response()(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive, send_with_headers)
        finally:  # also when the client went away mid-stream (the app is cancelled)
            record.status = record.status or 500  # an exception escaped: the server answers 500
            record.finish()
            self.limits.settle(record)
            self.metrics.observe(record)
            log_request(record, self.log_content)

    def _refusal(self, scope, record: RequestRecord) -> ApiError | None:
        """401 or 429 for a /v1/* request that has no accepted key or is over its requests per minute."""
        if not scope["path"].startswith(PROTECTED_PREFIX):
            return None
        if self.keys:
            record.key_id = self.keys.client_of(Headers(scope=scope).get("authorization"))
            if record.key_id is None:
                record.refusal = "unauthorized"
                return ApiError(401, "missing or invalid API key: send the header 'Authorization: Bearer KEY' "
                                     "with a key the server was started with (--api-key)", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        try:
            self.limits.admit_request(record)
        except ApiError as error:
            return error
        return None
