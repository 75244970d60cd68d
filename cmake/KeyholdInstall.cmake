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
