"""The OVF the engine stores for a VM (oVirt's flavour of DMTF OVF), and the few fields read back from one
when a VM is created from its configuration on restore."""

from __future__ import annotations

import datetime
import xml.etree.ElementTree as ET
from typing import Any

NS = {
    "ovf": "http://schemas.dmtf.org/ovf/envelope/1/",
    "rasd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData",
    "vssd": "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData",
    "xsi": "http://www.w3.org/2001/XMLSchema-instance",
}
for _p, _u in NS.items():
    ET.register_namespace(_p, _u)
BLANK = "00000000-0000-0000-0000-000000000000"
GIB = 1024**3


def _q(tag: str) -> str:
    p, _, t = tag.partition(":")
    return f"{{{NS[p]}}}{t}"


# oVirt writes these disk attributes with dashes (ovf:volume-format), which Python keywords cannot carry.
DASHED = {"volume_format", "volume_type", "disk_interface", "read_only", "pass_discard", "disk_alias",
          "disk_description", "wipe_after_delete"}


def _attr(key: str) -> str:
    prefix, _, name = key.partition("__")
    return _q(f"{prefix}:{name.replace('_', '-') if name in DASHED else name}")


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, _q(tag) if ":" in tag else tag, {_attr(k): v for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


def build(vm: dict[str, Any], disks: list[tuple[dict[str, Any], dict[str, Any], str]], dc_id: str) -> str:
    """OVF of ``vm``; ``disks`` are (disk, attachment, image id) triples."""
    env = ET.Element(_q("ovf:Envelope"), {_q("ovf:version"): "4.4.0.0"})
    refs = _sub(env, "References")
    for d, _a, image in disks:
        _sub(refs, "File", ovf__href=f"{d['id']}/{image}", ovf__id=image, ovf__size=str(d["size"]),
             ovf__description=d.get("description", ""), ovf__disk_storage_type="IMAGE", ovf__cinder_volume_type="")
    sec = _sub(env, "Section", **{"xsi__type": "ovf:DiskSection_Type"})
    _sub(sec, "Info", "List of Virtual Disks")
    for d, a, image in disks:
        _sub(sec, "Disk", ovf__diskId=image, ovf__size=str(max(1, d["size"] // GIB)),
             ovf__actual_size=str(d.get("actual", 0) // GIB), ovf__vm_snapshot_id=vm.get("active_snapshot", BLANK),
             ovf__parentRef="", ovf__fileRef=f"{d['id']}/{image}",
             ovf__format="http://www.vmware.com/specifications/vmdk.html#sparse",
             ovf__volume_format="COW" if d["format"] == "cow" else "RAW",
             ovf__volume_type="Sparse" if d["sparse"] else "Preallocated",
             ovf__disk_interface=_iface(a.get("interface", "virtio_scsi")),
             ovf__read_only=str(bool(a.get("read_only"))).lower(), ovf__shareable="false",
             ovf__boot=str(bool(a.get("bootable"))).lower(), ovf__pass_discard="false",
             ovf__disk_alias=d["name"], ovf__disk_description=d.get("description", ""),
             ovf__wipe_after_delete="false", ovf__disk_id=d["id"],
             ovf__disk_backup="Incremental" if d.get("backup") == "incremental" else "None")
    content = _sub(env, "Content", ovf__id="out", **{"xsi__type": "ovf:VirtualSystem_Type"})
    _sub(content, "Name", vm["name"])
    _sub(content, "Description", vm.get("description", ""))
    _sub(content, "Comment", "")
    created = datetime.datetime.fromtimestamp(vm.get("created", 0), datetime.UTC)
    _sub(content, "CreationDate", created.strftime("%Y/%m/%d %H:%M:%S"))
    _sub(content, "TemplateId", BLANK)
    _sub(content, "TemplateName", "Blank")
    _sub(content, "ClusterCompatibilityVersion", "4.7")
    _sub(content, "VmType", "1")
    _sub(content, "ClusterName", vm.get("cluster_name", "Default"))
    _sub(content, "Origin", "0")
    os_sec = _sub(content, "Section", ovf__id=vm["id"], ovf__required="false",
                  **{"xsi__type": "ovf:OperatingSystemSection_Type"})
    _sub(os_sec, "Info", "Guest Operating System")
    _sub(os_sec, "Description", vm.get("os", "other_linux"))
    hw = _sub(content, "Section", **{"xsi__type": "ovf:VirtualHardwareSection_Type"})
    _sub(hw, "Info", f"{vm['cpus']} CPU, {vm['memory'] // 2**20} Memory")
    system = _sub(hw, "System")
    _sub(system, "vssd:VirtualSystemType", "ENGINE 4.4.0.0")
    cpu = _sub(hw, "Item")
    _sub(cpu, "rasd:Caption", f"{vm['cpus']} virtual cpu")
    _sub(cpu, "rasd:Description", "Number of virtual CPU")
    _sub(cpu, "rasd:InstanceId", "1")
    _sub(cpu, "rasd:ResourceType", "3")
    _sub(cpu, "rasd:num_of_sockets", str(vm["cpus"]))
    _sub(cpu, "rasd:cpu_per_socket", "1")
    _sub(cpu, "rasd:threads_per_cpu", "1")
    mem = _sub(hw, "Item")
    _sub(mem, "rasd:Caption", f"{vm['memory'] // 2**20} MB of memory")
    _sub(mem, "rasd:Description", "Memory Size")
    _sub(mem, "rasd:InstanceId", "2")
    _sub(mem, "rasd:ResourceType", "4")
    _sub(mem, "rasd:AllocationUnits", "MegaBytes")
    _sub(mem, "rasd:VirtualQuantity", str(vm["memory"] // 2**20))
    for i, (d, a, image) in enumerate(disks):
        item = _sub(hw, "Item")
        _sub(item, "rasd:Caption", d["name"])
        _sub(item, "rasd:InstanceId", image)
        _sub(item, "rasd:ResourceType", "17")
        _sub(item, "rasd:HostResource", f"{d['id']}/{image}")
        _sub(item, "rasd:Parent", BLANK)
        _sub(item, "rasd:Template", BLANK)
        _sub(item, "rasd:ApplicationList", "")
        _sub(item, "rasd:StorageId", d["sd"])
        _sub(item, "rasd:StoragePoolId", dc_id)
        _sub(item, "Type", "disk")
        _sub(item, "Device", "disk")
        _sub(item, "rasd:Address", "")
        _sub(item, "BootOrder", "1" if a.get("bootable") else "0")
        _sub(item, "IsPlugged", str(bool(a.get("active", True))).lower())
        _sub(item, "IsReadOnly", str(bool(a.get("read_only"))).lower())
        _sub(item, "Alias", f"ua-{d['id']}")
        _ = i
    return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(env, encoding="unicode")


def _iface(v: str) -> str:
    return {"virtio_scsi": "VirtIO_SCSI", "virtio": "VirtIO", "ide": "IDE", "sata": "SATA"}.get(v, v)


def parse(data: str) -> dict[str, Any]:
    """Name, description, memory (bytes), CPUs and OS of an OVF; ValueError when it is not one."""
    root = ET.fromstring(data)
    content = root.find("Content")
    if content is None:
        raise ValueError("no Content section in OVF")
    out: dict[str, Any] = {"name": content.findtext("Name"), "description": content.findtext("Description") or ""}
    for item in content.iter("Item"):
        rtype = item.findtext(_q("rasd:ResourceType"))
        if rtype == "3":
            out["cpus"] = int(item.findtext(_q("rasd:num_of_sockets")) or 1)
        elif rtype == "4":
            out["memory"] = int(item.findtext(_q("rasd:VirtualQuantity")) or 1024) * 2**20
    for sec in content.iter("Section"):
        if sec.get(_q("xsi:type")) == "ovf:OperatingSystemSection_Type":
            out["os"] = sec.findtext("Description") or "other_linux"
    return out
