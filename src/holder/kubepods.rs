//! The kubelet's cgroup names: which pod and container a process's cgroup path belongs to.
//!
//! The kubelet files every container under a `kubepods` cgroup, by QoS class and pod UID, in
//! one of two spellings (its cgroup driver), and the runtime names the container's own cgroup:
//!
//! - systemd driver: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID>.slice/cri-containerd-<ID>.scope`,
//!   where the UID's dashes are written as underscores (a dash nests systemd slices);
//!   Guaranteed pods sit directly under `kubepods.slice` (`kubepods-pod<UID>.slice`).
//!   Runtimes: `cri-containerd-<ID>.scope` (containerd), `crio-<ID>.scope` (CRI-O, and
//!   `crio-conmon-<ID>.scope` for its monitor), `docker-<ID>.scope` (Docker, cri-dockerd).
//! - cgroupfs driver: `kubepods/burstable/pod<UID>/<ID>` with the UID as Kubernetes writes
//!   it; CRI-O names the container `crio-<ID>` there too.
//!
//! The kubepods tree may sit below a prefix (`--cgroup-root`, a kind node's
//! `kubelet.slice/kubelet-kubepods.slice/...`, a cgroup namespace's `/../..`), so the path
//! is read segment by segment rather than from its start.

use std::fmt;

use serde::Serialize;

/// The pod (and container) a cgroup path names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodCgroup {
    /// As Kubernetes writes it (`metadata.uid`): with dashes.
    pub pod_uid: String,
    pub qos: QosClass,
    /// Absent when the process sits in the pod's cgroup itself, not in a container's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<Container>,
}

/// A container's cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Container {
    /// Which runtime's naming the cgroup follows; `None` for the cgroupfs driver's bare id,
    /// which containerd and Docker both use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
    /// The container id (hex), as `crictl ps` and `kubectl get pod -o yaml` show it.
    pub id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
}

impl Runtime {
    pub fn label(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
        }
    }
}

/// The pod's QoS class, as its cgroup's parent says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl fmt::Display for PodCgroup {
    /// `pod 7c1e3f4a…` with the container's short id when known: short enough for a table.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pod {}…", short(&self.pod_uid, 8))?;
        if let Some(c) = &self.container {
            write!(f, " ctr {}…", short(&c.id, 12))?;
        }
        Ok(())
    }
}

fn short(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

/// The pod and container the cgroup `path` names, if it is one of the kubelet's.
pub fn parse(path: &str) -> Option<PodCgroup> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // The last segment that names a pod: a pod's cgroup never nests another pod's.
    let (at, pod_uid, qos) =
        segments.iter().enumerate().rev().find_map(|(i, seg)| {
            pod_segment(&segments[..i], seg).map(|(uid, qos)| (i, uid, qos))
        })?;
    let container = segments.get(at + 1).and_then(|seg| container_segment(seg));
    Some(PodCgroup {
        pod_uid,
        qos,
        container,
    })
}

/// The cgroup v2 path of a process from `/proc/PID/cgroup`: the `0::` line, else (cgroup v1
/// only) the first hierarchy's path that names a pod, else the first path.
pub fn cgroup_path(proc_cgroup: &str) -> Option<&str> {
    let paths: Vec<(&str, &str)> = proc_cgroup
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let id = fields.next()?;
            let _controllers = fields.next()?;
            Some((id, fields.next()?))
        })
        .collect();
    paths
        .iter()
        .find(|(id, _)| *id == "0")
        .or_else(|| paths.iter().find(|(_, p)| parse(p).is_some()))
        .or_else(|| paths.first())
        .map(|(_, p)| *p)
}

/// `kubepods-burstable-pod<UID_>.slice` (systemd) or `pod<UID>` below a kubepods segment
/// (cgroupfs): the pod UID with dashes, and the QoS class.
fn pod_segment(parents: &[&str], seg: &str) -> Option<(String, QosClass)> {
    if let Some(slice) = seg.strip_suffix(".slice") {
        let (prefix, uid) = slice.rsplit_once("-pod")?;
        if !prefix.contains("kubepods") || !is_uid(uid) {
            return None;
        }
        return Some((uid.replace('_', "-"), qos_of(prefix)));
    }
    let uid = seg.strip_prefix("pod")?;
    let kubepods = parents.iter().rposition(|p| *p == "kubepods")?;
    if !is_uid(uid) || uid.contains('_') {
        return None;
    }
    let qos = parents
        .get(kubepods + 1..)
        .map_or(QosClass::Guaranteed, |between| match between {
            ["burstable"] => QosClass::Burstable,
            ["besteffort"] => QosClass::BestEffort,
            _ => QosClass::Guaranteed,
        });
    Some((uid.to_string(), qos))
}

fn qos_of(prefix: &str) -> QosClass {
    if prefix.ends_with("-burstable") {
        QosClass::Burstable
    } else if prefix.ends_with("-besteffort") {
        QosClass::BestEffort
    } else {
        QosClass::Guaranteed
    }
}

/// A pod UID: a UUID (hex and dashes, or underscores in systemd's spelling), or a static
/// pod's 32-hex-digit hash.
fn is_uid(uid: &str) -> bool {
    uid.len() >= 32
        && uid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_')
}

fn container_segment(seg: &str) -> Option<Container> {
    let named = |rest: &str, runtime| {
        is_container_id(rest).then(|| Container {
            runtime: Some(runtime),
            id: rest.to_string(),
        })
    };
    if let Some(scope) = seg.strip_suffix(".scope") {
        if let Some(id) = scope.strip_prefix("cri-containerd-") {
            return named(id, Runtime::Containerd);
        }
        if let Some(id) = scope.strip_prefix("crio-conmon-") {
            return named(id, Runtime::CriO);
        }
        if let Some(id) = scope.strip_prefix("crio-") {
            return named(id, Runtime::CriO);
        }
        if let Some(id) = scope.strip_prefix("docker-") {
            return named(id, Runtime::Docker);
        }
        return None;
    }
    if let Some(id) = seg.strip_prefix("crio-") {
        return named(id, Runtime::CriO);
    }
    is_container_id(seg).then(|| Container {
        runtime: None,
        id: seg.to_string(),
    })
}

/// Container ids are 64 hex digits for every runtime here; shorter ones are accepted from 12
/// (a truncated id still finds the container with `crictl inspect`).
fn is_container_id(id: &str) -> bool {
    (12..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "7c1e3f4a-1b2c-4d5e-8f90-a1b2c3d4e5f6";
    const UID_: &str = "7c1e3f4a_1b2c_4d5e_8f90_a1b2c3d4e5f6";
    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn ctr(runtime: Option<Runtime>) -> Option<Container> {
        Some(Container {
            runtime,
            id: ID.to_string(),
        })
    }

    /// A path and what it names: (pod UID, QoS class, container).
    type Case = (String, Option<(&'static str, QosClass, Option<Container>)>);

    #[test]
    fn kubelet_cgroup_paths() {
        use QosClass::*;
        use Runtime::*;
        let table: Vec<Case> = vec![
            // systemd driver, each runtime and QoS class
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
                Some((UID, Burstable, ctr(Some(Containerd)))),
            ),
            (
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"),
                Some((UID, BestEffort, ctr(Some(CriO)))),
            ),
            (
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{ID}.scope"),
                Some((UID, BestEffort, ctr(Some(CriO)))),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{ID}.scope"),
                Some((UID, Guaranteed, ctr(Some(Docker)))),
            ),
            // the pod's own cgroup, no container
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"),
                Some((UID, Burstable, None)),
            ),
            // cgroupfs driver
            (
                format!("/kubepods/burstable/pod{UID}/{ID}"),
                Some((UID, Burstable, ctr(None))),
            ),
            (
                format!("/kubepods/besteffort/pod{UID}/crio-{ID}"),
                Some((UID, BestEffort, ctr(Some(CriO)))),
            ),
            (format!("/kubepods/pod{UID}/{ID}"), Some((UID, Guaranteed, ctr(None)))),
            // below a prefix: a kind node, a cgroup namespace, the lab's cgroup
            (
                format!("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
                Some((UID, Burstable, ctr(Some(Containerd)))),
            ),
            (
                format!("/../../kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
                Some((UID, Burstable, ctr(Some(Containerd)))),
            ),
            (
                format!("/smgc-x/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"),
                Some((UID, Burstable, ctr(Some(Containerd)))),
            ),
            // a static pod's UID is a hash without dashes
            (
                "/kubepods/burstable/pod0123456789abcdef0123456789abcdef/".to_string() + ID,
                Some(("0123456789abcdef0123456789abcdef", Burstable, ctr(None))),
            ),
            // an unknown runtime's scope: the pod, no container
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/podman-{ID}.scope"),
                Some((UID, Guaranteed, None)),
            ),
            // not the kubelet's
            ("/system.slice/nginx.service".to_string(), None),
            ("/user.slice/user-0.slice/session-3.scope".to_string(), None),
            ("/".to_string(), None),
            (format!("/system.slice/pod{UID}/{ID}"), None),
            ("/kubepods.slice/kubepods-podnotauid.slice".to_string(), None),
            (format!("/kubepods/burstable/pod{UID_}/{ID}"), None),
        ];
        for (path, want) in table {
            let want = want.map(|(uid, qos, container)| PodCgroup {
                pod_uid: uid.to_string(),
                qos,
                container,
            });
            assert_eq!(parse(&path), want, "{path}");
        }
    }

    #[test]
    fn proc_cgroup_files() {
        let v2 = format!("0::/kubepods/pod{UID}/{ID}\n");
        let hybrid = format!("12:memory:/kubepods/pod{UID}/{ID}\n1:name=systemd:/x\n0::/y\n");
        let v1 = format!("12:cpu,cpuacct:/\n11:memory:/kubepods/pod{UID}/{ID}\n");
        let table: Vec<(&str, Option<String>)> = vec![
            (&v2, Some(format!("/kubepods/pod{UID}/{ID}"))),
            (&hybrid, Some("/y".to_string())),
            (&v1, Some(format!("/kubepods/pod{UID}/{ID}"))),
            ("12:cpu:/a\n11:memory:/b\n", Some("/a".to_string())),
            ("", None),
            ("garbage", None),
        ];
        for (text, want) in table {
            assert_eq!(cgroup_path(text).map(str::to_string), want, "{text:?}");
        }
    }

    #[test]
    fn short_form_for_the_table() {
        let pod = parse(&format!("/kubepods/pod{UID}/{ID}")).unwrap();
        assert_eq!(pod.to_string(), "pod 7c1e3f4a… ctr 0123456789ab…");
    }
}
