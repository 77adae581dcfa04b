"""Audio decoding and resampling live in the kernel (gqa_toolkit.audio), shared with conversion's audio
calibration; re-exported here for the uptrain stage's modules. The kernel raises the toolkit's base error, which
`uptrain_errors` turns into this stage's."""

from gqa_toolkit.audio import (  # noqa: F401
    AUDIO_SUFFIXES,
    CHUNK,
    MIN_RATE,
    POLYPHASE_TAPS,
    ROLLOFF,
    ZEROS,
    load_audio,
    read_audio,
    resample,
)
