"""Stand-ins for the model in tests of the job queue: they test claims, leases and retries, never
transcription, and never read the audio. Product code has no fake engine; this is the tests' own.

`python -m tests.fakes --delay-s S [runner options]` is a standalone job runner process (the
product's `serve.job_runner.run_standalone`) on a `FakePipeline`.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from speech.pipeline import OnWindow
from speech.request import TranscriptionRequest
from speech.types import Segment, Transcript


class FakePipeline:
    """Answers every job with one empty segment after `delay_s`."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls = 0

    async def run(self, request: TranscriptionRequest, source: Path, *,
                  on_window: OnWindow | None = None) -> Transcript:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return Transcript(language=request.options.language or "en", duration=0.0,
                          segments=[Segment(id=0, start=0.0, end=0.0, text="")])


def fake_pipeline(delay_s: float = 0.0):  # noqa: ANN201 - a serve.job_runner.PipelineFactory
    """A `JobRunner` pipeline factory around one FakePipeline."""
    pipeline = FakePipeline(delay_s)

    async def current() -> FakePipeline:
        return pipeline

    current.pipeline = pipeline  # type: ignore[attr-defined]
    return current


def main(argv: list[str] | None = None) -> None:
    from config.logging_setup import configure_logging
    from config.settings import get_settings
    from serve.job_runner import run_standalone

    parser = argparse.ArgumentParser(prog="python -m tests.fakes")
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--lease-s", type=float, default=None)
    parser.add_argument("--heartbeat-s", type=float, default=None)
    parser.add_argument("--poll-s", type=float, default=None)
    parser.add_argument("--exit-when-idle", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(get_settings().LOG_LEVEL, get_settings().LOG_FILE)
    run_standalone(FakePipeline(args.delay_s), args)


if __name__ == "__main__":
    main()
