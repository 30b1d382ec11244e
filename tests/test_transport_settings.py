"""The two transports share one constructor and one pure "unknown model" resolution."""

from __future__ import annotations

import pytest

from cellsam_triton.client.transport import (
    AsyncTritonTransport,
    TritonTransport,
    _TransportSettings,
    is_unknown_model,
    resolve_unknown_model,
)
from cellsam_triton.errors import ServerError

SERVED = ["tiny", "tiny_encoder", "tiny_detector", "tiny_decoder"]


def test_no_model_asked_falls_back_to_the_sole_pipeline() -> None:
    assert resolve_unknown_model("h:1", "cellsam_lite", None, SERVED) == "tiny"


@pytest.mark.parametrize("requested, served", [("nope", SERVED), (None, SERVED + ["other"]), (None, [])])
def test_otherwise_one_line_naming_the_served_pipelines(requested, served) -> None:
    with pytest.raises(ServerError) as info:
        resolve_unknown_model("h:1", requested or "cellsam_lite", requested, served)
    message = str(info.value)
    assert "\n" not in message and "h:1" in message and "tiny_encoder" not in message
    assert ("tiny" in message) == bool(served)


def test_both_transports_share_the_settings() -> None:
    assert issubclass(TritonTransport, _TransportSettings) and issubclass(AsyncTritonTransport, _TransportSettings)
    assert "__init__" not in vars(AsyncTritonTransport) or AsyncTritonTransport.__init__.__code__.co_argcount <= 3
    assert is_unknown_model(ServerError("config of x failed: Request for unknown model: 'x' is not found"))
    assert not is_unknown_model(ServerError("cannot reach Triton"))
