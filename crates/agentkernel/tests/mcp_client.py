#!/usr/bin/env python3
"""A real MCP client (the official Python SDK, `mcp`) against `agentkernel
mcp`, driven by tests/mcp.rs: lists the tools, calls each one, a failing
command, and bad arguments. Prints `AKMCP ok CHECK` per check; any failure
raises (non-zero exit with a traceback naming the check).

  mcp_client.py BINARY IMAGE SANDBOX_NAME
"""
import asyncio
import json
import os
import sys

from mcp import ClientSession, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client

TOOLS = {"run_command", "create_sandbox", "exec", "list_sandboxes", "remove_sandbox",
         "read_file", "write_file"}


def ok(check):
    print(f"AKMCP ok {check}", flush=True)


def structured(result):
    data = result.structured_content
    assert isinstance(data, dict), f"no structured content: {result}"
    # The same JSON as text, for clients that read only content.
    assert json.loads(result.content[0].text) == data
    return data


async def expect_error(session, tool, arguments, needle):
    try:
        result = await session.call_tool(tool, arguments)
    except MCPError as e:
        assert needle in e.message, f"{tool}: {e.message!r} lacks {needle!r}"
        assert "\n" not in e.message, f"{tool}: not one line: {e.message!r}"
        return e
    raise AssertionError(f"{tool} {arguments} should have failed: {result}")


async def main(binary, image, name):
    params = StdioServerParameters(command=binary, args=["mcp"], env=dict(os.environ))
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            info = await session.initialize()
            assert info.server_info.name == "agentkernel", info.server_info
            ok("initialize")

            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert set(tools) == TOOLS, sorted(tools)
            for tool in tools.values():
                assert tool.description, tool.name
                assert tool.input_schema["type"] == "object", tool
            run_schema = tools["run_command"].input_schema
            assert "command" in run_schema["required"], run_schema
            assert run_schema["properties"]["command"]["description"], run_schema
            ok("list_tools")

            result = await session.call_tool("run_command", {
                "command": ["sh", "-c", "echo hello; echo oops >&2"], "image": image})
            data = structured(result)
            assert data == {"exit_code": 0, "stdout": "hello\n", "stderr": "oops\n"}, data
            assert not result.is_error
            ok("run_command")

            result = await session.call_tool("run_command", {
                "command": ["sh", "-c", "exit 7"], "image": image})
            assert structured(result)["exit_code"] == 7
            assert result.is_error, "a failing command marks the result as an error"
            ok("failing command")

            e = await expect_error(session, "run_command",
                                   {"command": ["true"], "profile": "bogus"}, "invalid value 'bogus'")
            assert e.data["fix"].startswith("expected one of"), e.data
            # Arguments that do not fit the schema: the SDK answers, as the MCP
            # spec asks, with an error result the model can read and correct.
            for arguments, needle in (({"command": "not-a-list"}, "invalid type"),
                                      ({"comand": ["true"]}, "unknown field `comand`")):
                result = await session.call_tool("run_command", arguments)
                assert result.is_error and needle in result.content[0].text, result
            await expect_error(session, "exec", {"name": "no-such-box", "command": ["true"]},
                               "no sandbox named no-such-box")
            await expect_error(session, "remove_sandbox", {"name": "--help"}, "invalid sandbox name")
            ok("bad arguments")

            created = structured(await session.call_tool("create_sandbox",
                                                         {"name": name, "image": image}))
            assert created["name"] == name and created["status"] == "running", created
            ok("create_sandbox")

            listed = structured(await session.call_tool("list_sandboxes", {}))
            assert [s["name"] for s in listed["sandboxes"]] == [name], listed
            ok("list_sandboxes")

            written = structured(await session.call_tool("write_file", {
                "name": name, "path": "/tmp/note.txt", "content": "ünïcode\n"}))
            assert written == {"path": "/tmp/note.txt", "bytes": 10}, written
            ok("write_file")

            result = await session.call_tool("exec", {
                "name": name, "command": ["sh", "-c", "cat /tmp/note.txt; exit 3"]})
            assert structured(result) == {"exit_code": 3, "stdout": "ünïcode\n", "stderr": ""}
            assert result.is_error
            ok("exec")

            read = structured(await session.call_tool("read_file",
                                                      {"name": name, "path": "/tmp/note.txt"}))
            assert read == {"path": "/tmp/note.txt", "content": "ünïcode\n"}, read
            await expect_error(session, "read_file", {"name": name, "path": "/tmp/none"},
                               "no such file /tmp/none")
            ok("read_file")

            removed = structured(await session.call_tool("remove_sandbox", {"name": name}))
            assert removed == {"removed": name}, removed
            listed = structured(await session.call_tool("list_sandboxes", {}))
            assert listed["sandboxes"] == [], listed
            ok("remove_sandbox")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
