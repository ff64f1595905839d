def main(argv=None) -> int:
    raise SystemExit("quamba-eval: not implemented yet")
