"""SpeechTokenizer codec (SEANet encoder/decoder + LSTM + 8-layer residual VQ), inference only.

Loads the reference `SpeechTokenizer/config.json` + `SpeechTokenizer.pt` strictly and turns
16 kHz waveforms into codes (n_q, batch, frames) and back.
"""

from miocli.codecs.speech.config import SpeechConfig
from miocli.codecs.speech.model import SpeechCodec

__all__ = ["SpeechCodec", "SpeechConfig"]
