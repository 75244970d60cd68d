# What `cmake --install` puts where (the front-ends install themselves from
# their own folders: keyhold.so into OpenSSL's modules directory,
# libkeyhold-pkcs11.so into <libdir>/pkcs11, p11-kit's module directory).
# With --prefix /usr this is the Debian layout; tests/install_test.sh checks
# it against what openssl and p11-kit report on the machine.
include(GNUInstallDirs)

install(TARGETS keyholdd RUNTIME DESTINATION ${CMAKE_INSTALL_SBINDIR})
install(TARGETS keyhold RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})

# Configuration examples: the daemon's (all defaults, documented) and the
# OpenSSL snippet to include from openssl.cnf. Neither is active by itself.
# /etc/keyhold whatever the prefix: keyholdd reads /etc/keyhold/keyholdd.toml.
# KH_ETC_FILES: the Debian package marks each as a conffile.
set(KH_ETC_FILES /etc/keyhold/keyholdd.toml.example /etc/keyhold/openssl-keyhold.cnf)
install(FILES conf/keyholdd.toml.example conf/openssl-keyhold.cnf
        DESTINATION /etc/keyhold)
# p11-kit registration (its package registry, as p11-kit reports it): every
# p11-kit user sees the keyhold token.
if(TARGET keyhold-pkcs11)
  if(NOT DEFINED KH_P11_CONFIG_DIR)
    pkg_get_variable(_kh_p11_configs p11-kit-1 p11_module_configs)
    if(NOT _kh_p11_configs)
      set(_kh_p11_configs "${CMAKE_INSTALL_FULL_DATADIR}/p11-kit/modules")
    endif()
    set(KH_P11_CONFIG_DIR "${_kh_p11_configs}"
        CACHE PATH "p11-kit module registry directory")
  endif()
  install(FILES conf/keyhold.module DESTINATION ${KH_P11_CONFIG_DIR})
endif()

# systemd: the socket and service units, the socket and state directories
# (tmpfiles.d) and the `keyhold` system user (sysusers.d), where systemd
# reports it looks for them (/lib/systemd/system, /usr/lib/tmpfiles.d,
# /usr/lib/sysusers.d on Debian 12) whatever the prefix. The service runs
# /usr/sbin/keyholdd (the package's layout): another prefix needs ExecStart=
# overridden in a drop-in (docs/systemd.md).
foreach(_kh_var systemdsystemunitdir tmpfilesdir sysusersdir)
  pkg_get_variable(_kh_${_kh_var} systemd ${_kh_var})
endforeach()
if(NOT _kh_systemdsystemunitdir)
  set(_kh_systemdsystemunitdir /lib/systemd/system)
endif()
if(NOT _kh_tmpfilesdir)
  set(_kh_tmpfilesdir /usr/lib/tmpfiles.d)
endif()
if(NOT _kh_sysusersdir)
  set(_kh_sysusersdir /usr/lib/sysusers.d)
endif()
set(KH_SYSTEMD_UNIT_DIR "${_kh_systemdsystemunitdir}" CACHE PATH "systemd system unit directory")
set(KH_TMPFILES_DIR "${_kh_tmpfilesdir}" CACHE PATH "tmpfiles.d directory")
set(KH_SYSUSERS_DIR "${_kh_sysusersdir}" CACHE PATH "sysusers.d directory")
install(FILES conf/keyholdd.service conf/keyholdd.socket DESTINATION ${KH_SYSTEMD_UNIT_DIR})
install(FILES conf/keyhold.tmpfiles DESTINATION ${KH_TMPFILES_DIR} RENAME keyhold.conf)
install(FILES conf/keyhold.sysusers DESTINATION ${KH_SYSUSERS_DIR} RENAME keyhold.conf)
