"""A supervisord XML-RPC extension: bring one running group in line with the re-read
configuration, process by process.

Why: supervisor's own `update` replaces a changed group whole, which restarts every
process in it; adding one model instance to the `llama` group would restart all the
others (and requeue their running tasks). `appliance.updateGroup` adds the new
processes to the live group (they start by themselves: autostart), removes stopped
ones that the configuration no longer has, and leaves the others running.

Loaded inside supervisord ([rpcinterface:appliance] in supervisord.conf), so it
imports nothing of the appliance; it relies on supervisor 4.3's internals (pinned).
"""
from __future__ import annotations

from supervisor.states import ProcessStates
from supervisor.xmlrpc import Faults, RPCError

API_VERSION = "1.0"


class ApplianceNamespace:
    def __init__(self, supervisord):
        self.supervisord = supervisord

    def getAPIVersion(self):
        """@return string version of this extension"""
        return API_VERSION

    def updateGroup(self, name):
        """Apply the re-read configuration (call supervisor.reloadConfig first) to one
        running group without touching its unchanged processes.

        New processes are added (autostart starts them); a process the configuration
        no longer has is removed if it is stopped, else reported in `still_running`
        (stop it, then call again); a process whose configuration changed is replaced
        if it is stopped, else reported in `changed` (stop it, call again, start it).

        @param string name  the group's name
        @return struct      {added, removed, changed, still_running}: arrays of names
        """
        config = next((c for c in self.supervisord.options.process_group_configs if c.name == name), None)
        if config is None:
            raise RPCError(Faults.BAD_NAME, name)
        group = self.supervisord.process_groups.get(name)
        if group is None:
            self.supervisord.add_process_group(config)
            return {"added": [p.name for p in config.process_configs], "removed": [], "changed": [],
                    "still_running": []}
        wanted = {p.name: p for p in config.process_configs}
        added, removed, changed, still_running = [], [], [], []
        for pname, pconfig in wanted.items():
            process = group.processes.get(pname)
            if process is None or (process.config != pconfig and _stopped(process)):
                pconfig.create_autochildlogs()
                group.processes[pname] = pconfig.make_process(group)
                (added if process is None else changed).append(pname)
            elif process.config != pconfig:
                changed.append(pname)
        for pname in [p for p in group.processes if p not in wanted]:
            if _stopped(group.processes[pname]):
                del group.processes[pname]  # its log files stay
                removed.append(pname)
            else:
                still_running.append(pname)
        # The group's config now names what it runs, so that supervisor's own diff
        # (reread) sees it as up to date; processes keep their own config objects.
        keep = [group.processes[p].config for p in group.processes]
        config.process_configs = keep
        group.config = config
        return {"added": added, "removed": removed, "changed": changed, "still_running": still_running}


def _stopped(process) -> bool:
    return process.get_state() in (ProcessStates.STOPPED, ProcessStates.EXITED, ProcessStates.FATAL)


def make_rpcinterface(supervisord, **config):
    return ApplianceNamespace(supervisord)
