def main() -> None:
    print("chatspot-edge")
