"""The openai boundary: every exception class is mapped, once, to a typed error."""

from __future__ import annotations

import inspect

import grpc
import httpx2
import openai
import pytest

from korero.server.errors import UpstreamError
from korero.server.llm.errors import OPENAI_ERROR_TABLE, translate_openai_error


def _openai_exception_classes() -> list[type[BaseException]]:
    # `type(obj)`, not `inspect.getmembers`: openai's lazy module proxies answer
    # `__class__` by importing their module (seconds of imports for nothing).
    return [
        obj
        for obj in vars(openai).values()
        if issubclass(type(obj), type)
        and issubclass(obj, BaseException)
        and obj.__module__.startswith("openai")
        and not obj.__name__.startswith("_")
    ]


def _instance(cls: type[BaseException]) -> BaseException:
    request = httpx2.Request("POST", "http://upstream/v1/chat/completions")
    response = httpx2.Response(
        429, request=request, headers={"retry-after": "2"}, json={"error": {"message": "x"}}
    )
    for args, kwargs in (
        ((), {"message": "m", "response": response, "body": None}),
        ((), {"request": request}),
        ((), {"response": response, "body": None}),
        (("m",), {"request": request, "body": None}),
        (("m",), {}),
        ((), {}),
    ):
        try:
            return cls(*args, **kwargs)
        except TypeError:
            continue
    return cls.__new__(cls)


def test_the_openai_package_exports_exceptions() -> None:
    assert len(_openai_exception_classes()) >= 15


@pytest.mark.parametrize("cls", _openai_exception_classes(), ids=lambda c: c.__name__)
def test_every_openai_exception_class_has_its_own_entry(cls: type[BaseException]) -> None:
    # An explicit row per class: a new class in a new openai release fails here
    # until someone decides what it means for clients.
    assert cls in OPENAI_ERROR_TABLE, f"{cls.__name__} is not mapped"
    error = translate_openai_error(_instance(cls))
    assert isinstance(error, UpstreamError)
    code, reason, retryable = OPENAI_ERROR_TABLE[cls]
    assert error.code == code
    assert error.reason == reason
    assert error.retryable == retryable
    assert error.reason.isupper()
    assert error.message


def test_rate_limit_carries_retry_after() -> None:
    error = translate_openai_error(_instance(openai.RateLimitError))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.retry_after == 2.0


def test_a_lost_connection_mid_stream_is_an_interrupted_answer() -> None:
    exc = _instance(openai.APIConnectionError)
    assert translate_openai_error(exc).reason == "UPSTREAM_UNREACHABLE"
    assert translate_openai_error(exc, mid_stream=True).reason == "UPSTREAM_STREAM_INTERRUPTED"
    assert (
        translate_openai_error(httpx2.RemoteProtocolError("cut")).reason
        == "UPSTREAM_STREAM_INTERRUPTED"
    )


def test_sse_lines_are_parsed_without_the_sdk_models() -> None:
    from korero.server.llm.provider import SSE_DONE, LLMChunk, parse_sse_line  # noqa: PLC0415

    chunk = (
        'data: {"id":"c","object":"chat.completion.chunk","choices":'
        '[{"index":0,"delta":{"content":" hi"},"finish_reason":null}]}'
    )
    assert parse_sse_line(chunk) == LLMChunk(" hi", None, None)
    end = 'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}'
    assert parse_sse_line(end) == LLMChunk("", "length", None)
    usage = 'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}'
    parsed = parse_sse_line(usage)
    assert parsed is not None
    assert parsed.usage is not None
    assert parsed.usage.total_tokens == 10
    assert parse_sse_line("data: [DONE]") is SSE_DONE
    assert parse_sse_line("") is None
    assert parse_sse_line(": keep-alive comment") is None
    with pytest.raises(UpstreamError) as bad:
        parse_sse_line("data: {not json")
    assert bad.value.reason == "UPSTREAM_BAD_RESPONSE"
    with pytest.raises(UpstreamError) as err:
        parse_sse_line('data: {"error": {"message": "overloaded", "type": "server_error"}}')
    assert err.value.reason == "UPSTREAM_ERROR"
    assert err.value.retryable


# The aiohttp transport (llm/transport.py) --------------------------------------------


def _aiohttp_exception_classes() -> list[type[BaseException]]:
    import aiohttp  # noqa: PLC0415

    return [
        obj
        for _, obj in inspect.getmembers(aiohttp, inspect.isclass)
        if issubclass(obj, aiohttp.ClientError)
    ]


@pytest.mark.parametrize("cls", _aiohttp_exception_classes(), ids=lambda c: c.__name__)
def test_every_aiohttp_exception_becomes_an_httpx2_transport_error(
    cls: type[BaseException],
) -> None:
    from korero.server.llm.transport import translate_aiohttp_error  # noqa: PLC0415

    request = httpx2.Request("POST", "http://upstream/v1/chat/completions")
    mapped = translate_aiohttp_error(cls.__new__(cls), request)
    assert isinstance(mapped, httpx2.TransportError)
    # Mid-stream, every one of them is a cut answer, as with the default transport.
    assert translate_openai_error(mapped).reason == "UPSTREAM_STREAM_INTERRUPTED"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ClientConnectorError", httpx2.ConnectError),  # refused: unreachable, not a timeout
        ("ClientConnectorDNSError", httpx2.ConnectError),
        ("ClientConnectorCertificateError", httpx2.ConnectError),
        ("ConnectionTimeoutError", httpx2.ConnectTimeout),
        ("SocketTimeoutError", httpx2.ReadTimeout),
        ("ServerDisconnectedError", httpx2.RemoteProtocolError),
        ("ClientPayloadError", httpx2.RemoteProtocolError),
        ("ClientProxyConnectionError", httpx2.ProxyError),
        ("ClientOSError", httpx2.ReadError),
    ],
)
def test_aiohttp_errors_map_to_what_the_default_transport_raises(
    name: str, expected: type[BaseException]
) -> None:
    import aiohttp  # noqa: PLC0415

    from korero.server.llm.transport import translate_aiohttp_error  # noqa: PLC0415

    cls = getattr(aiohttp, name)
    request = httpx2.Request("POST", "http://upstream/v1/chat/completions")
    assert type(translate_aiohttp_error(cls.__new__(cls), request)) is expected
