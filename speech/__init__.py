"""The speech engine: audio in, a timestamped, speaker-labelled transcript out.

Pure Python + torch: nothing here knows of Ray, HTTP or the database, so the same code serves
the online API, the bulk pipeline and the command line, and runs alone in tests and benchmarks.
"""
