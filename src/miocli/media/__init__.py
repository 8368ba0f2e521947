"""Media files in and out: images, audio and video keyframes, read and checked before any model runs.

May import: errors, quiet.
"""
