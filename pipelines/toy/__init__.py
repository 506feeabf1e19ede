"""The toy SD3: a procedural world of coloured shapes, its judge, and the script that trains on it.

See issue 13: a small SD3 built from the real diffusers classes and trained on CPU, so that image
quality and prompt adherence can be measured in numbers.
"""
