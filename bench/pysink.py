"""Fallback sink for the benchmark when Postfix's smtp-sink is absent: counts messages like smtp-sink -c."""
import asyncio
import sys

from aiosmtpd.smtp import SMTP

count = 0


class Handler:
    async def handle_DATA(self, server, session, envelope):
        global count
        count += 1
        sys.stdout.write(f"mesg={count}\r")
        sys.stdout.flush()
        return "250 2.0.0 Ok"


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(Handler(), enable_SMTPUTF8=True), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
