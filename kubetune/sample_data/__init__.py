"""Bundled demo data (``kubetune://tcm-demo``): synthetic TCM Q&A in Alpaca columns, not medical advice."""

from __future__ import annotations

TCM_DEMO_FILE = "tcm_demo.jsonl"
