def main(argv=None) -> int:
    raise SystemExit("quamba-compat: not implemented yet")
