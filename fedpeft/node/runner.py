"""`fedpeft-clientapp`: the process a SuperExec starts for each message, in place of Flower's.

Flower's `flwr-clientapp` (flwr 1.39, supernode/runtime/run_clientapp.py) pulls the message and
the run's bundle from the SuperNode, installs the bundle, and imports the ClientApp it names from
the bundle's own folder: the bundle's code runs on the node. This runner follows the same protocol
with the SuperNode (pull the task, heartbeat, push the reply and the task's status) but never
installs or imports the bundle: it checks the bundle against the node's pin (node/approval.py)
and hands the message to the ClientApp of the fedpeft installed on the node. Whatever a bundle
holds, the node's own code, and so its own privacy policy, decides what leaves the node.
"""

from __future__ import annotations

import argparse
from logging import ERROR, INFO

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import SUPERNODE_DEFAULT_CLIENT_ADDRESS
from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.telemetry import EventType
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedpeft.clients.secure_sum_mods import is_key_stage, key_stage_app
from fedpeft.node.approval import Approval

#: written to the node's log for every message, so an operator sees which code handled it
HANDLED_BY = "fedpeft-clientapp: the installed fedpeft ClientApp handles run %d (bundle %s %s)"


def run(
    runtime_api_address: str,
    token: str,
    insecure: bool,
    certificates: bytes | None = None,
    parent_pid: int | None = None,
) -> None:
    """Handle one message of the SuperNode with the installed ClientApp, if the bundle is pinned.

    A SecAgg+ key stage goes to `key_stage_app`, which imports no training code; every other
    message to the full ClientApp, imported only then.
    """
    approval = Approval.from_env()
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=certificates,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retry_invoker,
    )
    heartbeat: HeartbeatSender | None = None
    message: Message | None = None
    reply: Message | None = None
    context: Context | None = None
    status, details, exit_code = SubStatus.FAILED, "fedpeft-clientapp failed", ExitCode.SUCCESS

    def on_exit() -> None:
        retry_invoker.max_tries = 1
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat is not None and heartbeat.is_running:
            heartbeat.stop()
        client.close()

    register_signal_handlers(
        event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE,
        exit_message="Task stopped.",
        exit_handlers=[on_exit],
    )
    try:
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message, context, run_info, fab = pull_task_input(client)
        approval.check(run_info.fab_id, run_info.fab_version, fab.hash_str)
        log(INFO, HANDLED_BY, run_info.run_id, run_info.fab_id, run_info.fab_version)
        reply = _app_for(message)(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - every failure becomes the message's error reply
        log(ERROR, "fedpeft-clientapp: the message failed", exc_info=exc)
        reason = f"{type(exc)}:<'{exc}'>"
        status, details = SubStatus.FAILED, reason
        if message is not None:
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                reply_to=message,
            )
        exit_code = ExitCode.TASK_PROC_EXCEPTION
    finally:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception as exc:  # noqa: BLE001
                log(ERROR, "fedpeft-clientapp: could not push the reply", exc_info=exc)
                exit_code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
    flwr_exit(code=exit_code, event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE)


def _app_for(message: Message) -> ClientApp:
    if is_key_stage(message):
        return key_stage_app
    from fedpeft.clients.client_app import app

    return app


def main() -> None:
    """Entry point of `fedpeft-clientapp` (the arguments SuperExec gives `flwr-clientapp`)."""
    parser = argparse.ArgumentParser(description="fedpeft's ClientApp runner for a SuperNode")
    parser.add_argument("--runtime-api-address", default=SUPERNODE_DEFAULT_CLIENT_ADDRESS)
    add_args_flwr_app_common(parser=parser)
    args = parser.parse_args()
    run(
        runtime_api_address=args.runtime_api_address,
        token=try_obtain_flwr_app_token(args),
        insecure=args.insecure,
        certificates=validate_and_resolve_root_certificates(args.root_certificates, args.insecure),
        parent_pid=args.parent_pid,
    )


if __name__ == "__main__":
    main()
