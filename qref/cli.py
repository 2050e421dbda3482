def main():
    raise SystemExit("qref check: not yet available")
