"""What a restore needs: disks created empty, a VM created from an OVF, attachments, start/stop, removal."""

from __future__ import annotations

import logging
from typing import Any

import ovirtsdk4.types as types

from control.engine.base import EngineBase
from control.errors import NotFound

log = logging.getLogger(__name__)


class RestoreOps(EngineBase):
    def create_disk(self, alias: str, size: int, fmt: str, sparse: bool, storage_domain_id: str,
                    incremental: bool = False) -> str:
        """Create an empty disk and wait until it is ok; returns its id."""
        spec = types.Disk(
            name=alias, alias=alias, provisioned_size=size, format=types.DiskFormat(fmt), sparse=sparse,
            storage_domains=[types.StorageDomain(id=storage_domain_id)],
            backup=types.DiskBackup.INCREMENTAL if incremental else None)
        disks = self.system.disks_service()
        d = self.call("create disk", lambda: disks.add(spec), "storage domain", storage_domain_id)
        svc = disks.disk_service(d.id)
        self.wait(f"creation of disk {alias}", lambda: self.call("get disk", svc.get, "disk", d.id),
                  done=lambda x: x.status == types.DiskStatus.OK,
                  failed=lambda x: "status illegal" if x.status == types.DiskStatus.ILLEGAL else None)
        log.info("disk created disk=%s alias=%s size=%d format=%s", d.id, alias, size, fmt)
        return str(d.id)

    def remove_disk(self, disk_id: str) -> bool:
        """Remove a disk; False if already gone. Idempotent (clean-up)."""
        try:
            self.call("remove disk", self.system.disks_service().disk_service(disk_id).remove, "disk", disk_id)
        except NotFound:
            return False
        return True

    def create_vm_from_ovf(self, ovf: str, name: str, cluster_id: str) -> str:
        """Create a VM from an OVF (disks are attached separately); returns its id."""
        spec = types.Vm(
            name=name, cluster=types.Cluster(id=cluster_id),
            initialization=types.Initialization(
                configuration=types.Configuration(type=types.ConfigurationType.OVF, data=ovf)))
        vm = self.call("create vm", lambda: self.system.vms_service().add(spec, clone=True), "cluster", cluster_id)
        log.info("vm created vm=%s name=%s", vm.id, name)
        return str(vm.id)

    def attach_disk(self, vm_id: str, disk_id: str, interface: str, bootable: bool) -> None:
        svc = self.vm_service(vm_id).disk_attachments_service()
        att = types.DiskAttachment(disk=types.Disk(id=disk_id), interface=types.DiskInterface(interface),
                                   bootable=bootable, active=True)
        self.call("attach disk", lambda: svc.add(att), "VM", vm_id)

    def start_vm(self, vm_id: str) -> None:
        self.call("start vm", self.vm_service(vm_id).start, "VM", vm_id)

    def stop_vm(self, vm_id: str) -> None:
        self.call("stop vm", self.vm_service(vm_id).stop, "VM", vm_id)

    def remove_vm(self, vm_id: str) -> bool:
        """Remove a VM (clean-up of a failed restore); False if already gone."""
        try:
            self.call("remove vm", self.vm_service(vm_id).remove, "VM", vm_id)
        except NotFound:
            return False
        return True

    def find_vm_by_name(self, name: str) -> Any | None:
        try:
            return self.find_vm(name)
        except NotFound:
            return None
