"""An error of the NATS client that a command did not wrap still ends as one line and exit 1."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest
import typer

from cim_place.cli._output import errors_as_exit


@pytest.mark.parametrize(
    "error",
    [nats.errors.NoRespondersError(), nats.js.errors.ServiceUnavailableError(), TimeoutError()],
)
def test_a_client_error_is_one_line(error: Exception, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(typer.Exit) as ended, errors_as_exit():
        raise error
    assert ended.value.exit_code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the NATS servers ")
    assert err.count("\n") == 1


def test_a_bug_is_not_hidden() -> None:
    with pytest.raises(KeyError), errors_as_exit():
        raise KeyError("a bug")
