#!/usr/bin/env python3
"""Embeds deploy/azure/install.sh into azuredeploy.json.

The template carries the install script base64-encoded (variable
installScriptBase64) so that a deployment needs nothing but the template and
the package URL. Run this after every change to install.sh:

    python3 deploy/azure/sync_install_script.py          # rewrite the template
    python3 deploy/azure/sync_install_script.py --check  # exit 1 if stale
"""
import base64
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
TEMPLATE = HERE / "azuredeploy.json"
SCRIPT = HERE / "install.sh"
LINE = re.compile(r'("installScriptBase64": ")([A-Za-z0-9+/=]*)(")')


def encoded() -> str:
    return base64.b64encode(SCRIPT.read_bytes()).decode("ascii")


def main() -> int:
    text = TEMPLATE.read_text(encoding="utf-8")
    matches = LINE.findall(text)
    if len(matches) != 1:
        print(f"{TEMPLATE}: expected one installScriptBase64 variable, found {len(matches)}", file=sys.stderr)
        return 1
    want = encoded()
    if matches[0][1] == want:
        print(f"{TEMPLATE.name}: embedded install.sh is up to date")
        return 0
    if "--check" in sys.argv[1:]:
        print(f"{TEMPLATE.name}: embedded install.sh is stale; run python3 deploy/azure/sync_install_script.py",
              file=sys.stderr)
        return 1
    TEMPLATE.write_text(LINE.sub(lambda m: m.group(1) + want + m.group(3), text), encoding="utf-8")
    print(f"{TEMPLATE.name}: embedded install.sh updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
