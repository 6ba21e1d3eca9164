"""Write docs/configuration.md from the config schema: `python scripts/config_reference.py`."""

from pathlib import Path

from nmt.config_reference import render

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    out.write_text(render() + "\n", encoding="utf-8")
    print(f"wrote {out}")
