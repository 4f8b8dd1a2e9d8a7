//! `hetkv.EmbeddedCluster`: shards in this process, on loopback TCP.

use std::sync::Mutex;

use hetkv_client::Cluster as RustCluster;
use hetkv_fallback_tcp::ClientConfig;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::*;

/// Shards running in this process, on loopback TCP (for notebooks and tests): a cluster with
/// every method of `hetkv.Cluster`, whose `addrs` other processes can connect to. Refused in a
/// process that is one of several ranks (`WORLD_SIZE` above 1, as torchrun sets it), where each
/// rank would train a private table.
#[pyclass(module = "hetkv", extends = Cluster, frozen)]
pub(crate) struct EmbeddedCluster {
    pub(crate) shards: Mutex<Option<hetkv_store::EmbeddedCluster>>,
}

#[pymethods]
impl EmbeddedCluster {
    /// Starts `shards` shards; `tables` is a list of dicts of `create_table`'s arguments.
    #[new]
    #[pyo3(signature = (shards = 2, tables = None, data_dir = None))]
    fn new(
        py: Python<'_>,
        shards: u32,
        tables: Option<Vec<Bound<'_, PyDict>>>,
        data_dir: Option<std::path::PathBuf>,
    ) -> PyResult<PyClassInitializer<Self>> {
        if shards == 0 {
            return Err(PyValueError::new_err(
                "an embedded cluster needs at least one shard",
            ));
        }
        // Under torchrun every rank would start shards of its own and train a private table.
        let world = std::env::var("WORLD_SIZE").ok();
        if let Some(world) = world.and_then(|w| w.trim().parse::<u64>().ok()) {
            if world > 1 {
                return Err(Error::new_err(format!(
                    "hetkv.EmbeddedCluster runs its shards inside this process, and this process \
                     is one of WORLD_SIZE={world} ranks: each rank would train a table of its \
                     own. Start the shards once (`hetkv serve`, one per shard) and connect every \
                     rank to them with hetkv.connect(addrs)"
                )));
            }
        }
        let mut specs = Vec::new();
        for t in tables.unwrap_or_default() {
            let get = |k: &str| t.get_item(k);
            let name: String = get("name")?
                .ok_or_else(|| PyValueError::new_err("a table needs a name"))?
                .extract()?;
            let rows: u64 = get("rows")?
                .ok_or_else(|| PyValueError::new_err(format!("table {name} needs rows")))?
                .extract()?;
            let dim: u32 = get("dim")?
                .ok_or_else(|| PyValueError::new_err(format!("table {name} needs dim")))?
                .extract()?;
            let init = match get("init")? {
                Some(v) => Some(v.extract::<Initializer>()?),
                None => None,
            };
            let optimizer = match get("optimizer")? {
                Some(v) => Some(v.extract::<Optimizer>()?),
                None => None,
            };
            let buckets = match get("buckets")? {
                Some(v) => Some(v.extract::<u32>()?),
                None => None,
            };
            let dynamic = match get("dynamic")? {
                Some(v) => Some(v.extract::<Dynamic>()?),
                None => None,
            };
            specs.push(spec_of(
                py,
                name,
                rows,
                dim,
                init,
                optimizer,
                (buckets, dynamic),
            )?);
        }
        let started = py.detach(|| {
            let cluster = match &data_dir {
                None => hetkv_store::EmbeddedCluster::start(shards),
                Some(dir) => {
                    hetkv_store::EmbeddedCluster::start_with(shards, Default::default(), |i| {
                        hetkv_store::ShardConfig {
                            data_dir: Some(dir.join(format!("shard{i}"))),
                            ..hetkv_store::ShardConfig::new(i, shards)
                        }
                    })
                }
            }
            .map_err(|e| e.to_string())?;
            let client = RustCluster::connect_tcp(cluster.addrs(), &ClientConfig::default())
                .map_err(|e| e.to_string())?;
            for spec in &specs {
                client.create_table(spec).map_err(|e| e.to_string())?;
            }
            Ok::<_, String>((cluster, client))
        });
        let (cluster, client) = started.map_err(Error::new_err)?;
        Ok(
            PyClassInitializer::from(Cluster { inner: client }).add_subclass(Self {
                shards: Mutex::new(Some(cluster)),
            }),
        )
    }

    /// Stops the shards (the cluster's tables are gone unless they were checkpointed); every
    /// later call on the cluster, its tables and caches fails at once (`hetkv.ConnectionError`).
    fn close(slf: &Bound<'_, Self>, py: Python<'_>) {
        slf.as_super().get().inner.close();
        let taken = slf
            .get()
            .shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(c) = taken {
            py.detach(|| c.shutdown());
        }
    }

    /// Whether the shards are running.
    #[getter]
    fn running(&self) -> bool {
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __exit__(
        slf: &Bound<'_, Self>,
        py: Python<'_>,
        _kind: Option<Bound<'_, PyAny>>,
        _value: Option<Bound<'_, PyAny>>,
        _traceback: Option<Bound<'_, PyAny>>,
    ) -> bool {
        Self::close(slf, py);
        false
    }
}
