"""The media codecs MIO's tokens come from: SEED-Tokenizer-2 and unCLIP for images (`seed`),
SpeechTokenizer for speech (`speech`), checkpoint-compatible with the reference's weights.

May import: errors, quiet.
"""
