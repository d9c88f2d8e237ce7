def main() -> None:  # replaced in the client work
    raise SystemExit("scribe: client not built yet")
