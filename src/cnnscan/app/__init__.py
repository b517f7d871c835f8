"""The web app, "a CT scan of your CNN": a Streamlit page over the library.

`cnnscan app` starts it (`launch`). `page.py` is the Streamlit script: widgets only. What it
computes lives in plain modules that tests and threads can call without Streamlit:
`sources` (settings, models, weight files, pictures and uploads), `core` (the per-session
workspace and the shared result cache), `evaluation` (the leaderboard view),
`pictures` (grid cells, colour bars, downloads) and `jobs` (synthesis in the background).
"""

from pathlib import Path

PAGE = Path(__file__).with_name("page.py")

__all__ = ["PAGE"]
